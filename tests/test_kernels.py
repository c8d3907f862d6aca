"""Generated Triton kernels vs dense references (interpreter on CPU; CUDA when present).

References are built independently of the kernels' index arithmetic: a factor's dense
matrix by Kronecker products with identities, permutations by reshape/permute of an
``arange`` (digits) or the table itself, all in float64.
"""

import threading

import pytest
import torch

import ksfx
from ksfx.codegen import KernelKey, TileConfig, cached_kernels, get_kernel, kernel_mode, tiling, traffic
from ksfx.codegen.tiling import forward_heuristic, grad_heuristic, grad_mode, window_tile
from ksfx.codegen.tuning import forward_config_space
from ksfx.config import config
from ksfx.ops import chain_op, torch_path, triton_path
from ksfx.pattern import Chain, DigitPerm, FactorStep, IndexPerm, KSPattern

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

#: Max abs error allowed, relative to the reference's max magnitude.
TOL = {torch.float32: 2e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}

PATTERNS = [
    (2, 16, 24, 3),  # dot (batch-last) / dot3 gathered δ (batch-first): a, d > 1, b != c, masked γ tiles
    (1, 32, 32, 3),  # dot3 gathered δ: tiles dividing b and c (the static masks over the runs' padding)
    (2, 20, 16, 6),  # dot3 gathered δ of 6 padded to 8: masked β tiles
    (1, 24, 20, 4),  # dot3 flat (γ, δ) runs: masked β and γ tiles
    (2, 32, 16, 2),  # dot3 flat, tiles dividing b and c (the unmasked loads)
    (2, 32, 16, 16),  # dot3 3-D tiles: two δ tiles per α
    (1, 17, 33, 1),  # dot: odd sizes, masked tiles
    (3, 2, 5, 2),  # fma: small blocks
    (4, 2, 2, 8),  # fma: a butterfly factor
    (2, 1, 4, 3),  # b = 1
    (2, 5, 1, 3),  # c = 1
    (1, 20, 6, 2),  # b >= 16 but c < 16: fma
    (2, 3, 18, 2),  # fma batch-last: a runtime loop over groups of 4 γ, the last one padded
    (16, 2, 2, 1),  # window (batch-first): a butterfly factor with d = 1, several windows
    (100, 7, 4, 1),  # window: an output run of no power of two, windows of 32 or 64 blocks, the last partial
]


@pytest.fixture(params=["interpret", pytest.param("cuda", marks=cuda)])
def device(request, monkeypatch):
    if request.param == "interpret":
        request.getfixturevalue("triton_interpret")
        return torch.device("cpu")
    # These tests are about the kernels: bypass the dispatch policy (which may pick bmm).
    monkeypatch.setattr(config, "dispatch", "triton")
    return torch.device("cuda")


# ----------------------------------------------------------------------------- references
def dense_factor(values: torch.Tensor) -> torch.Tensor:
    """``I_a ⊗ block ⊗ I_d`` entry layout, by an einsum with identities."""
    a, b, c, d = values.shape
    eye_a, eye_d = torch.eye(a, dtype=values.dtype), torch.eye(d, dtype=values.dtype)
    return torch.einsum("abcd,ae,df->abdecf", values, eye_a, eye_d).reshape(a * b * d, a * c * d)


def perm_matrix(perm) -> torch.Tensor:
    """``P`` with ``(P @ v)[j] = v[source(j)]``, the source table built without sympy."""
    if isinstance(perm, DigitPerm):
        source = torch.arange(perm.size).reshape(perm.radices).permute(perm.order).reshape(-1)
    else:
        source = torch.tensor(perm.indices_)
    return torch.eye(perm.size, dtype=torch.float64)[source]


def dense_step(step: FactorStep, values: torch.Tensor) -> torch.Tensor:
    """Dense ``P_out @ K @ P_in`` of a factor step (float64)."""
    matrix = dense_factor(values.double())
    if step.in_perm is not None:
        matrix = matrix @ perm_matrix(step.in_perm)
    if step.out_perm is not None:
        matrix = perm_matrix(step.out_perm) @ matrix
    return matrix


def reference(step, x, values, batch_last, bias=None):
    w = dense_step(step, values.cpu())
    x64 = x.double().cpu()
    y = w @ x64 if batch_last else x64 @ w.T
    if bias is not None:
        y = y + (bias.double().cpu()[:, None] if batch_last else bias.double().cpu())
    return y


def assert_close(actual, expected, dtype):
    scale = expected.abs().max().clamp_min(1.0)
    err = (actual.double().cpu() - expected).abs().max() / scale
    assert err < TOL[dtype], f"max error {err:.3g} > {TOL[dtype]} ({dtype})"


def make(pattern, n, batch_last, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    p = KSPattern(*pattern)
    x = torch.randn((p.in_features, n) if batch_last else (n, p.in_features), generator=g)
    values = torch.randn(p.as_tuple(), generator=g) / p.c**0.5
    return x.to(device, dtype), values.to(device, dtype)


def random_index_perm(size, seed=1):
    return IndexPerm(tuple(torch.randperm(size, generator=torch.Generator().manual_seed(seed)).tolist()))


def digit_perm(size):
    """A transposition of the two largest factors of ``size`` (identity for primes)."""
    for r in range(int(size**0.5), 1, -1):
        if size % r == 0:
            return DigitPerm((r, size // r), (1, 0))
    return None


# ----------------------------------------------------------------------------- forward
@pytest.mark.parametrize("pattern", PATTERNS, ids=str)
@pytest.mark.parametrize("batch_last", [False, True], ids=["bfirst", "blast"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_forward_matches_dense(device, pattern, batch_last, dtype):
    step = FactorStep(KSPattern(*pattern))
    x, values = make(pattern, 37, batch_last, dtype, device)
    y = triton_path.factor_forward(x, values, step, batch_last)
    assert y.dtype == dtype and y.device == x.device
    assert_close(y, reference(step, x, values, batch_last), dtype)


PERMS = ["digit-in", "index-in", "digit-out", "index-out", "both"]


def with_perms(pattern, kind):
    p = KSPattern(*pattern)
    in_perm = {"digit-in": digit_perm(p.in_features), "index-in": random_index_perm(p.in_features)}.get(kind)
    out_perm = {"digit-out": digit_perm(p.out_features), "index-out": random_index_perm(p.out_features, 2)}.get(kind)
    if kind == "both":
        in_perm, out_perm = digit_perm(p.in_features), random_index_perm(p.out_features, 3)
    return FactorStep(p, in_perm, out_perm)


@pytest.mark.parametrize("pattern", [(2, 16, 24, 3), (1, 24, 20, 4), (3, 2, 5, 2), (2, 3, 18, 2)], ids=str)
@pytest.mark.parametrize("kind", PERMS)
@pytest.mark.parametrize("batch_last", [False, True], ids=["bfirst", "blast"])
def test_forward_folds_permutations(device, pattern, kind, batch_last):
    step = with_perms(pattern, kind)
    x, values = make(pattern, 19, batch_last, torch.float32, device)
    bias = torch.randn(step.pattern.out_features).to(device)
    y = triton_path.factor_forward(x, values, step, batch_last, bias)
    assert_close(y, reference(step, x, values, batch_last, bias), torch.float32)


@pytest.mark.parametrize("pattern", [(2, 16, 24, 3), (3, 2, 5, 2)], ids=str)
@pytest.mark.parametrize("batch_last", [False, True], ids=["bfirst", "blast"])
def test_forward_batch_one_and_bias(device, pattern, batch_last):
    step = FactorStep(KSPattern(*pattern))
    x, values = make(pattern, 1, batch_last, torch.bfloat16, device)
    bias = torch.randn(step.pattern.out_features).to(device, torch.bfloat16)
    y = triton_path.factor_forward(x, values, step, batch_last, bias)
    assert_close(y, reference(step, x, values, batch_last, bias), torch.bfloat16)


@pytest.mark.parametrize("pattern", [(2, 16, 24, 3), (3, 2, 5, 2)], ids=str)
@pytest.mark.parametrize("batch_last", [False, True], ids=["bfirst", "blast"])
def test_forward_non_contiguous(device, pattern, batch_last):
    """x transposed and strided in storage; values a transposed view, as the backward passes them."""
    p = KSPattern(*pattern)
    step = FactorStep(p.transpose())
    _, values = make(pattern, 1, False, torch.float32, device)
    values_t = values.permute(0, 2, 1, 3)
    n, features = 23, p.out_features
    if batch_last:
        x = torch.randn(n, 2 * features, device=device).T[::2]
    else:
        x = torch.randn(2 * features, 2 * n, device=device).T[::2, ::2]
    assert x.shape == ((features, n) if batch_last else (n, features))
    assert 1 not in x.stride() and not values_t.is_contiguous()
    y = triton_path.factor_forward(x, values_t, step, batch_last)
    assert_close(y, reference(step, x, values_t, batch_last), torch.float32)


def test_forward_every_config_of_the_space(device):
    """Autotuning may pick any config of the pruned space: each must be correct."""
    for pattern, n in [((1, 17, 33, 1), 37), ((3, 2, 5, 2), 37)]:
        step = FactorStep(KSPattern(*pattern), digit_perm(KSPattern(*pattern).in_features))
        x, values = make(pattern, n, False, torch.float16, device)
        expected = reference(step, x, values, False)
        space = forward_config_space(step, n, 2, False, num_sms=2)
        assert 1 < len(space) <= 13 and len(set(space)) == len(space)
        for tile in space:
            y = triton_path.factor_forward(x, values, step, False, tile=tile)
            assert_close(y, expected, torch.float16)


def test_forward_through_the_autotuner(device, monkeypatch):
    """``config.autotune`` launches through triton.autotune; the kept config is reported."""
    monkeypatch.setattr(config, "autotune", True)
    step = with_perms((2, 16, 24, 3), "both")
    x, values = make((2, 16, 24, 3), 37, True, torch.float16, device)
    y = triton_path.factor_forward(x, values, step, True)
    assert_close(y, reference(step, x, values, True), torch.float16)
    assert isinstance(triton_path.tuned_config(x, step, True), TileConfig)


# ----------------------------------------------------------------------------- dvalues
def dense_grad_values(step, dy, x, values, batch_last):
    """``dL/dvalues`` for ``L = <dy, y>`` by autograd through the dense reference."""
    v = values.double().cpu().requires_grad_(True)
    w = dense_step(step, v)
    x64 = x.double().cpu()
    y = w @ x64 if batch_last else x64 @ w.T
    (y * dy.double().cpu()).sum().backward()
    return v.grad


@pytest.mark.parametrize("pattern", PATTERNS, ids=str)
@pytest.mark.parametrize("batch_last", [False, True], ids=["bfirst", "blast"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_grad_values_matches_dense(device, pattern, batch_last, dtype):
    step = with_perms(pattern, "both")
    x, values = make(pattern, 37, batch_last, dtype, device)
    dy = torch.randn((step.pattern.out_features, 37) if batch_last else (37, step.pattern.out_features))
    dy = dy.to(device, dtype)
    grad = triton_path.factor_grad_values(dy, x, step, batch_last)
    assert grad.shape == values.shape and grad.dtype == dtype
    assert_close(grad, dense_grad_values(step, dy, x, values, batch_last), dtype)


def test_grad_values_on_a_wgmma_tile_taller_than_the_block(device):
    """16-bit weight gradients of a block with 48 <= b < 64 rows take a masked 64-row β tile
    (one wgmma) rather than a dividing 16-row one."""
    pattern = (2, 48, 16, 4)
    assert grad_heuristic(KSPattern(*pattern), 37, 2, False, 132).block_n == 64
    step = with_perms(pattern, "both")
    x, values = make(pattern, 37, False, torch.bfloat16, device)
    dy = torch.randn(37, step.pattern.out_features).to(device, torch.bfloat16)
    grad = triton_path.factor_grad_values(dy, x, step, False)
    assert_close(grad, dense_grad_values(step, dy, x, values, False), torch.bfloat16)


@pytest.mark.parametrize("pattern", [(2, 16, 24, 3), (4, 2, 2, 8), (16, 2, 2, 1)], ids=str)
@pytest.mark.parametrize("splits", [1, 3])
def test_grad_values_batch_splits(device, pattern, splits):
    """Batch chunks reduced separately, the last one ragged, sum to the full reduction."""
    step = FactorStep(KSPattern(*pattern))
    x, values = make(pattern, 70, False, torch.float32, device)
    dy = torch.randn(70, step.pattern.out_features).to(device)
    mode = grad_mode(step.pattern)
    if mode == "window":  # 4 windows of 4 blocks
        tile = TileConfig(8, *window_tile(step.pattern, 4), splits=splits)
    else:
        tile = TileConfig(16, 16, 16 if mode == "dot" else 1, splits=splits)
    grad = triton_path.factor_grad_values(dy, x, step, False, tile=tile)
    assert_close(grad, dense_grad_values(step, dy, x, values, False), torch.float32)


# ----------------------------------------------------------------------------- through the op
@pytest.mark.parametrize("batch_last", [False, True], ids=["bfirst", "blast"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_ks_matmul_gradients_run_triton(device, batch_last, dtype):
    """x, every factor and the bias get dense-reference gradients; launches are Triton."""
    patterns = [(1, 4, 4, 4), (1, 16, 24, 1), (2, 3, 2, 4)]  # W = K1 @ P @ K2 @ K3
    p1, p2, p3 = (KSPattern(*p) for p in patterns)
    chain = Chain((p1, random_index_perm(p1.in_features), p2, p3))
    g = torch.Generator().manual_seed(5)
    factors = [(torch.randn(p.as_tuple(), generator=g) / p.c**0.5).to(device, dtype) for p in (p1, p2, p3)]
    n = 11
    x = torch.randn((chain.in_features, n) if batch_last else (n, chain.in_features), generator=g).to(device, dtype)
    bias = torch.randn(chain.out_features, generator=g).to(device, dtype)
    dy = torch.randn((chain.out_features, n) if batch_last else (n, chain.out_features), generator=g).to(device, dtype)
    leaves = [t.clone().requires_grad_(True) for t in (x, *factors, bias)]
    ksfx.stats(reset=True)
    y = ksfx.ks_matmul(leaves[0], leaves[1:4], batch_last=batch_last, bias=leaves[4], chain=chain)
    y.backward(dy)
    counts = ksfx.stats()
    name = "triton-interpret" if device.type == "cpu" else "triton"
    # forward, recomputed intermediates and dx: per factor or as fused segments (forward_chain)
    assert counts.get(f"{name}.forward", 0) + counts.get(f"{name}.forward_chain", 0) >= 3
    assert counts.get(f"{name}.grad_values", 0) == 3
    assert not any("cpu" in name for name in counts)

    refs = [t.detach().double().cpu().requires_grad_(True) for t in (x, *factors, bias)]
    w = chain.to_dense(refs[1:4])
    y_ref = (w @ refs[0] + refs[4][:, None]) if batch_last else (refs[0] @ w.T + refs[4])
    y_ref.backward(dy.double().cpu())
    assert_close(y.detach(), y_ref.detach(), dtype)
    for leaf, ref in zip(leaves, refs, strict=True):
        assert_close(leaf.grad, ref.grad, dtype)


class _Unbuildable:
    """A launcher whose kernels Triton cannot build: each launch raises ``error``; counts them."""

    def __init__(self, error: Exception):
        self.error, self.launches = error, 0

    def __call__(self, kernel):
        return self

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.launches += 1
            raise self.error

        return launch


@pytest.mark.parametrize("batch_last", [False, True], ids=["bfirst", "blast"])
def test_a_kernel_triton_cannot_build_falls_back_to_the_torch_path(triton_interpret, monkeypatch, caplog, batch_last):
    """More shared memory than the device has, or a compiler error, at the first launch: the
    step runs the plain-torch path, forward, fused segments and backward, with one warning a
    kernel and a fallback count; later calls fail fast, without building again."""
    import triton

    unbuildable = _Unbuildable(triton.runtime.errors.OutOfResources(240 * 1024, 227 * 1024, "shared memory"))
    monkeypatch.setattr(triton_path, "_launcher", unbuildable)
    monkeypatch.setattr(triton_path, "_UNAVAILABLE", {})
    monkeypatch.setattr(chain_op, "_WARNED", set())
    patterns = [(1, 16, 24, 1), (6, 2, 2, 2), (12, 2, 2, 1)]  # a dot step, then a fused small-block pair
    chain = Chain(tuple(KSPattern(*p) for p in patterns))
    g = torch.Generator().manual_seed(3)
    factors = [torch.randn(KSPattern(*p).as_tuple(), generator=g, requires_grad=True) for p in patterns]
    n = 7
    x = torch.randn((chain.in_features, n) if batch_last else (n, chain.in_features), generator=g, requires_grad=True)
    ksfx.stats(reset=True)
    with caplog.at_level("WARNING", logger="ksfx.ops"):
        y = ksfx.ks_matmul(x, factors, batch_last=batch_last, chain=chain)
        y.sum().backward()
        first = unbuildable.launches
        ksfx.ks_matmul(x, factors, batch_last=batch_last, chain=chain)
    counts = ksfx.stats()
    assert counts.get("cpu.fallback", 0) >= 3 and not any(name.startswith("triton") for name in counts), counts
    assert unbuildable.launches == first  # the second call built nothing
    warnings = [r.getMessage() for r in caplog.records if "could not build" in r.getMessage()]
    assert warnings and len(warnings) == len(set(warnings)) and "OutOfResources" in warnings[0]

    refs = [t.detach().double().requires_grad_(True) for t in (x, *factors)]
    w = chain.to_dense(refs[1:])
    y_ref = w @ refs[0] if batch_last else refs[0] @ w.T
    y_ref.sum().backward()
    assert_close(y.detach(), y_ref.detach(), torch.float32)
    for leaf, ref in zip((x, *factors), refs, strict=True):
        assert_close(leaf.grad, ref.grad, torch.float32)


def test_errors_other_than_build_failures_propagate(triton_interpret, monkeypatch):
    """A bug is not a build failure: interpreter errors and others are raised, not hidden."""
    import triton

    x, values = torch.randn(3, 24), torch.randn(1, 16, 24, 1)
    for error in (triton.runtime.errors.InterpreterError("a kernel bug"), ValueError("bad argument")):
        monkeypatch.setattr(triton_path, "_launcher", _Unbuildable(error))
        with pytest.raises(type(error)):
            ksfx.ks_matmul(x, [values])


def test_compile_dynamic_batch_propagates_fake_shapes(triton_interpret):
    """aot_eager traces the op with fake tensors (symbolic batch) and runs the kernels."""
    torch._dynamo.reset()
    p1, p2 = KSPattern(2, 16, 16, 1), KSPattern(1, 4, 2, 8)
    g = torch.Generator().manual_seed(0)
    factors = [torch.randn(p.as_tuple(), generator=g) for p in (p1, p2)]
    spec = Chain((p1, p2)).to_spec()

    def layer(x):
        y = torch.ops.ksfx.ks_chain(x.reshape(-1, p2.in_features), factors, spec, False, None, 0)
        return torch.relu(y.reshape(*x.shape[:-1], p1.out_features)) * 2

    compiled = torch.compile(layer, backend="aot_eager", dynamic=True, fullgraph=True)
    dense = Chain((p1, p2)).to_dense(factors)
    ksfx.stats(reset=True)
    for n in (5, 9, 1):
        x = torch.randn(3, n, p2.in_features, generator=g)
        y = compiled(x)
        assert y.shape == (3, n, p1.out_features)
        assert_close(y, torch.relu(x.double() @ dense.double().T) * 2, torch.float32)
    assert ksfx.stats() == {"triton-interpret.forward_chain": 3}  # one fused launch per call


def test_fake_tensor_shapes_with_symbolic_batch():
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.symbolic_shapes import ShapeEnv

    chain = Chain((KSPattern(2, 16, 24, 3),))
    with FakeTensorMode(shape_env=ShapeEnv()) as mode:
        x = mode.from_tensor(torch.empty(8, chain.in_features), static_shapes=False)
        values = torch.empty(2, 16, 24, 3)
        y = torch.ops.ksfx.ks_chain(x, [values], chain.to_spec(), False, None, 0)
        assert y.shape[1] == chain.out_features and y.shape[0] is x.shape[0]


# ----------------------------------------------------------------------------- codegen
def test_generated_index_maps_match_torch_path(triton_interpret):
    """The kernel for an identity-valued step is a pure gather: it must equal the CPU path."""
    p = KSPattern(3, 2, 5, 2)
    step = FactorStep(p, random_index_perm(p.in_features), digit_perm(p.out_features))
    x, values = make(p.as_tuple(), 4, False, torch.float32, "cpu")
    expected = torch_path.factor_forward(x, values, step, False)
    assert_close(triton_path.factor_forward(x, values, step, False), expected.double(), torch.float32)


def test_kernel_cache_is_keyed_and_thread_safe(triton_interpret):
    step = FactorStep(KSPattern(2, 3, 4, 5), digit_perm(40))
    key = KernelKey("forward", step, "fma", False, "float16", True, "-", None)
    kernels = []
    threads = [threading.Thread(target=lambda: kernels.append(get_kernel(key, config.cache_dir))) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(kernels) == 4 and all(k is kernels[0] for k in kernels)
    assert key in cached_kernels()
    other = KernelKey("forward", step, "fma", True, "float16", True, "-", None)
    assert get_kernel(other, config.cache_dir) is not kernels[0]
    source = key.source()
    assert "tl.static_range(4)" in source and "@triton.jit" in source


def test_source_has_no_index_table_without_index_perm():
    digit = KernelKey("forward", FactorStep(KSPattern(1, 16, 16, 4), digit_perm(64)), "dot", False, "float32", False,
                      "ieee", None)  # fmt: skip
    assert "in_table_ptr +" not in digit.source() and 'input_precision="ieee"' in digit.source()
    index = KernelKey("grad", FactorStep(KSPattern(1, 16, 16, 4), random_index_perm(64)), "dot", True, "bfloat16",
                      True, "-", None)  # fmt: skip
    assert "tl.load(in_table_ptr +" in index.source() and ".to(tl.float32)" in index.source()


@pytest.mark.parametrize("kind", ["forward", "grad"])
@pytest.mark.parametrize("mode", ["dot", "fma", "window"])
def test_source_calls_no_jit_helpers_of_triton_language(kind, mode):
    """Interpreted kernels cannot call tl.cdiv/tl.sum/... once triton was imported uninterpreted."""
    import re

    import triton.language as tl
    from triton.runtime.jit import JITFunction

    step = FactorStep(KSPattern(2, 16, 24, 3), digit_perm(144), random_index_perm(96))
    source = KernelKey(kind, step, mode, False, "bfloat16", True, "-", None).source()
    used = set(re.findall(r"\btl\.(\w+)", source))
    assert {"load", "store"} <= used
    assert not [name for name in used if isinstance(getattr(tl, name, None), JITFunction)]


def test_bad_inputs_raise_clear_errors(triton_interpret):
    step = FactorStep(KSPattern(2, 3, 4, 5))
    with pytest.raises(ValueError, match="features"):
        triton_path.factor_forward(torch.randn(3, 39), torch.randn(2, 3, 4, 5), step, False)
    with pytest.raises(ValueError, match=r"shape \(2, 3, 4, 5\)"):
        triton_path.factor_forward(torch.randn(3, 40), torch.randn(2, 4, 3, 5), step, False)
    with pytest.raises(ValueError, match="does not match"):
        triton_path.factor_grad_values(torch.randn(3, 31), torch.randn(3, 40), step, False)
    with pytest.raises(TypeError, match="Triton kernels take"):
        triton_path.factor_forward(torch.randn(3, 40).double(), torch.randn(2, 3, 4, 5).double(), step, False)
    with pytest.raises(TypeError, match="must match x"):
        triton_path.factor_grad_values(torch.randn(3, 30).half(), torch.randn(3, 40), step, False)
    with pytest.raises(ValueError, match="power of two"):
        TileConfig(24, 16)
    with pytest.raises(ValueError, match="unknown kernel kind"):
        KernelKey("sideways", step, "fma", False, "float32", True, "-", None).source()


def test_empty_batch(triton_interpret):
    step = FactorStep(KSPattern(2, 3, 4, 5))
    y = triton_path.factor_forward(torch.randn(0, 40), torch.randn(2, 3, 4, 5), step, False)
    assert y.shape == (0, 30)
    grad = triton_path.factor_grad_values(torch.randn(0, 30), torch.randn(0, 40), step, False)
    assert torch.equal(grad, torch.zeros(2, 3, 4, 5))


# ----------------------------------------------------------------------------- tiling and traffic
def test_heuristics_respect_the_kernel_constraints():
    for pattern in [(2, 48, 192, 1), (1, 768, 192, 2), (256, 2, 2, 32), (1, 2, 2, 4096), (1, 20, 6, 2)]:
        p = KSPattern(*pattern)
        for n, itemsize, batch_last in [(25088, 4, False), (1, 2, True), (4096, 2, False)]:
            fwd = forward_heuristic(p, n, itemsize, batch_last, 132)
            grad = grad_heuristic(p, n, itemsize, batch_last, 132)
            if kernel_mode(p) == "dot":
                assert min(fwd.block_m, fwd.block_n, fwd.block_k) >= 16
                assert min(grad.block_m, grad.block_n, grad.block_k) >= 16
            assert 1 <= grad.splits <= max(1, n // grad.block_m)


def test_weight_gradient_pipelines_fit_in_shared_memory():
    """fp32 ``grad_dot3`` tiles of 8 δ took 240 KiB at 3 stages (sm_90 census), over the 227 KiB
    a block may have: every weight-gradient pipeline of the paper grid stays within budget."""
    from benchmarks.patterns import load_grid

    for pattern in map(KSPattern, *zip(*load_grid(), strict=True)):
        for itemsize, batch_last in [(4, False), (2, False), (4, True)]:
            mode = grad_mode(pattern, batch_last)
            if mode in ("dot", "dot3"):
                cfg = grad_heuristic(pattern, 25088, itemsize, batch_last, 132)
                width = tiling.delta_tile(pattern) if mode == "dot3" else 1
                assert tiling.grad_pipeline_bytes(cfg, width, itemsize) <= tiling.SMEM_BUDGET, (pattern, cfg)
    cfg = grad_heuristic(KSPattern(1, 1024, 1024, 8), 25088, 4, False, 132)
    assert (cfg.block_m, cfg.num_stages) == (32, 2)  # a stage less, the batch step kept


def test_traffic_model_hand_computed():
    # KS(2,16,16,1), batch-last fp32, n = 64, one batch tile, one β tile: exactly optimal.
    t = traffic.bytes_moved(FactorStep(KSPattern(2, 16, 16, 1)), 64, True, TileConfig(64, 16, 16), 4)
    assert (t.x, t.values, t.y, t.tables) == (2 * 16 * 64 * 4, 2 * 16 * 16 * 4, 2 * 16 * 64 * 4, 0)
    assert t.total == t.lower_bound == KSPattern(2, 16, 16, 1).min_bytes(64, 4)
    # b = 32 with 16-wide β tiles: x read twice; two batch tiles: values read twice.
    t = traffic.bytes_moved(FactorStep(KSPattern(2, 32, 16, 1)), 64, True, TileConfig(32, 16, 16), 4)
    assert t.x == 2 * (2 * 16 * 64 * 4) and t.values == 2 * (2 * 32 * 16 * 4) and t.y == 2 * 32 * 64 * 4
    # d = 8 in 32-byte sectors: batch-last (dot, one δ per program) reads whole sectors along the
    # batch; batch-first the δ-tiled kernel moves contiguous (γ, δ) runs, also whole sectors ...
    p = KSPattern(1, 16, 16, 8)
    for batch_last in (True, False):
        t = traffic.bytes_moved(FactorStep(p), 32, batch_last, TileConfig(32, 16, 16), 4, sector=32)
        assert t.x == 32 * 128 * 4 and t.y == 32 * 128 * 4
    # ... where one δ per program would put each fp32 x element of a group in its own sector.
    assert traffic.bytes_moved(FactorStep(p), 32, False, TileConfig(32, 16, 16), 4, sector=32, mode="dot").x == (
        8 * 32 * 16 * 32
    )
    # FMA rows tile = one α block of 16 rows; an index table costs one int32 per lookup.
    step = FactorStep(KSPattern(4, 2, 2, 8), IndexPerm(tuple(reversed(range(64)))))
    t = traffic.bytes_moved(step, 32, False, TileConfig(32, 16), 4)
    assert (t.x, t.values, t.y, t.tables) == (64 * 32 * 4, 128 * 4, 64 * 32 * 4, 64 * 2 * 4)
    # Batch-last FMA: each row's c = 5 values padded to 8 (two groups of 4 γ), read and copied so.
    p = KSPattern(3, 2, 5, 2)
    t = traffic.bytes_moved(FactorStep(p), 32, True, TileConfig(32, 16), 4)
    assert t.values == p.out_features * 8 * 4 and t.relayout == (p.nnz + p.out_features * 8) * 4
    # Its row tiles enumerate β fastest: 16 rows of KS(1, 4, 2, 8) are 4 β x 4 δ, and the two
    # tiles read disjoint x features (in output order each would read all 16: x twice).
    p = KSPattern(1, 4, 2, 8)
    t = traffic.bytes_moved(FactorStep(p), 32, True, TileConfig(32, 16), 4)
    assert t.x == p.in_features * 32 * 4 and t.y == p.out_features * 32 * 4


def test_traffic_model_from_device_memory_counts_re_reads_once_while_values_fit_in_l2(monkeypatch):
    # KS(2,32,16,1), batch-last fp32, n = 64, 32-row tiles of 16 β: from L2, x twice and the values twice.
    step, cfg = FactorStep(KSPattern(2, 32, 16, 1)), TileConfig(32, 16, 16)
    t = traffic.bytes_moved(step, 64, True, cfg, 4)
    assert t.total == t.lower_bound + 2 * 16 * 64 * 4 + 2 * 32 * 16 * 4
    assert t.dram == t.lower_bound and t.dram_ratio == 1.0
    # Values over the L2 budget come from device memory once per batch tile, as from L2.
    monkeypatch.setattr(traffic, "L2_RESIDENT_BYTES", 2 * 32 * 16 * 4 - 1)
    t = traffic.bytes_moved(step, 64, True, cfg, 4)
    assert t.dram == t.lower_bound + 2 * 32 * 16 * 4
    # A fused segment: from device memory its input, its output and every value once.
    steps = (FactorStep(KSPattern(1, 2, 2, 8)), FactorStep(KSPattern(8, 2, 2, 1)))
    monkeypatch.undo()
    t = traffic.segment_bytes(steps, 64, False, 16, 4)
    assert t.values == 4 * (32 + 32) * 4 and t.dram == t.lower_bound == 4 * (64 * 32 + 64)


@pytest.mark.parametrize("abcd", [(4, 1, 1, 1), (1, 1, 2, 4), (3, 4, 1, 1)])
def test_traffic_model_handles_radix_one_digits(abcd):
    # b = 1 or d = 1 makes a row digit a constant; one tile covering everything is optimal.
    p = KSPattern(*abcd)
    t = traffic.bytes_moved(FactorStep(p), 8, False, TileConfig(8, 16), 4)
    assert (t.x, t.values, t.y) == (p.in_features * 8 * 4, p.nnz * 4, p.out_features * 8 * 4)
    assert t.total == t.lower_bound


@pytest.mark.parametrize("pattern", [(2, 16, 24, 3), (1, 24, 20, 4), (3, 2, 5, 2)], ids=str)
def test_64_bit_index_variant(triton_interpret, monkeypatch, pattern):
    """The INT64 branch (tensors whose offsets pass 2**31) computes the same, forward and dvalues."""
    monkeypatch.setattr(triton_path, "_needs_int64", lambda *tensors: True)
    step = with_perms(pattern, "both")
    x, values = make(pattern, 19, False, torch.float32, "cpu")
    bias = torch.randn(step.pattern.out_features)
    y = triton_path.factor_forward(x, values, step, False, bias)
    assert_close(y, reference(step, x, values, False, bias), torch.float32)
    dy = torch.randn(19, step.pattern.out_features)
    grad = triton_path.factor_grad_values(dy, x, step, False)
    assert_close(grad, dense_grad_values(step, dy, x, values, False), torch.float32)


@pytest.mark.parametrize(
    ("shape", "order", "strides"),
    [
        ((2, 17, 33, 1), (0, 1, 2, 3), (816, 48, 1, 1)),  # gamma rows of 33 padded to 48 (d = 1)
        ((1, 906, 448, 4), (0, 3, 2, 1), (4 * 448 * 912, 1, 912, 448 * 912)),  # beta rows of 906 padded to 912
        ((1, 448, 906, 4), (0, 3, 2, 1), (448 * 906 * 4, 1, 448, 448 * 906)),  # aligned: only re-laid out
    ],
)
def test_values_rows_are_padded_for_the_dot_kernel(shape, order, strides):
    """The dot kernel's values copy pads the innermost rows with zeros to 16 elements
    (Triton's divisibility hint); the values read through the strides are unchanged."""
    values = torch.randn(shape)
    assert tiling.values_order(KSPattern(*shape), True) == order
    laid = triton_path._laid_out(values, order, tiling.values_rows(KSPattern(*shape), True))
    assert laid.stride() == strides and torch.equal(laid, values)
    storage = torch.as_strided(laid, (laid.untyped_storage().nbytes() // laid.element_size(),), (1,), 0)
    assert storage.count_nonzero() == values.count_nonzero()  # the padding is zeros: the kernel reads it
