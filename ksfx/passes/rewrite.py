"""The pass: find chains in an aten graph, decide, verify, and replace them by the KS op.

``run_pass`` is the whole pipeline on one graph and returns one :class:`ChainReport`
per chain found (rewritten or not, always with a reason). Each rewritten chain becomes::

    x2d    = aten.reshape(root, [-1, in])            # or [in, -1] batch-last
    values = views (or constant-index gathers) of the weights' source tensors
    y2d    = ksfx.ks_chain(x2d, values, spec, batch_last, bias, dense)  # dense: see the op
    y      = aten.reshape(y2d, end.shape)

so parameters stay graph inputs (read at every call, gradients flow to them through the
op's registered autograd) and everything around the chain is left to the inner compiler.
A chain on middle dimensions (channels-first ``(N, C, L)`` mixing ``C``) moves the
features to the front around the op: ``x2d = reshape(permute(reshape(root, [-1, in, L]),
[1, 0, 2]), [in, -1])``, and back after it.
"""

from __future__ import annotations

import logging
import math
import operator
from dataclasses import dataclass, field, replace

import torch
import torch.fx as fx

import ksfx.ops  # noqa: F401  (registers torch.ops.ksfx)
from ksfx.config import config
from ksfx.passes.atoms import AtomError, leaves
from ksfx.passes.cost import Estimate, decide, estimate
from ksfx.passes.detect import COPY_OPS, VIEW_OPS, ActT, BranchSum, Interpreter, Unsupported
from ksfx.passes.structure import ChainPlan, ValueSource, plan_chain, reroot
from ksfx.passes.verify import verify

log = logging.getLogger("ksfx.passes")
aten = torch.ops.aten


@dataclass
class ChainReport:
    """One detected chain. ``patterns`` are ``(a, b, c, d)`` leftmost first in ``W``."""

    patterns: list[tuple[int, int, int, int]]
    permutations: list[str]
    rewritten: bool
    reason: str
    nodes: list[str]
    root: str
    end: str
    batch_last: bool | None = None
    chain: str = ""
    estimate: Estimate | None = None
    verification: str = ""
    plan: ChainPlan | None = field(default=None, repr=False)
    # Why the chain ends where it does: the first later end of the same chain that failed.
    stopped: str = ""

    @property
    def in_features(self) -> int | None:
        return self.plan.chain.in_features if self.plan else None

    @property
    def out_features(self) -> int | None:
        return self.plan.chain.out_features if self.plan else None


def _debug(message: str, *args) -> None:
    if config.debug:
        log.warning(message, *args)
    else:
        log.debug(message, *args)


def find_chains(gm: fx.GraphModule, weights: set[fx.Node], known: dict[fx.Node, torch.Tensor]):
    """``[(plan | None, reason, end_node, state)]`` for every maximal chain of the graph.

    With a plan, ``reason`` says why no later end of the same chain planned ("" if none).
    """
    interpreter = Interpreter(gm, weights, known)
    states = interpreter.run()
    by_chain: dict[int, list[tuple[fx.Node, ActT]]] = {}
    for node, state in states.items():
        if isinstance(state, ActT) and state.has_work:
            by_chain.setdefault(state.chain_id, []).append((node, state))
    found = []
    order = {node: k for k, node in enumerate(gm.graph.nodes)}
    for candidates in by_chain.values():
        reason = None
        for node, state in reversed(candidates):
            try:
                plan = _widest_batch(state, node, states)
                _check_linear_use(plan, states, state.root)
                _check_dtypes(plan)
                _check_no_mutation(plan, order)
                _end_layout(plan)
                found.append((plan, reason or "", node, state))
                break
            except (Unsupported, AtomError) as err:
                reason = reason or f"{node.name}: {err}"
            except Exception as err:  # noqa: BLE001 - a bug planning one chain must not cost the others
                log.debug("ksfx: planning %s raised", node.name, exc_info=True)
                reason = reason or f"{node.name}: internal error while planning ({type(err).__name__}: {err})"
        else:
            node, state = candidates[-1]
            found.append((None, reason, node, state))
    # A planned sum of branches takes their chains in: they are not chains of their own.
    absorbed = {cid for plan, _, _, state in found if plan is not None for cid in _branch_chains(state.steps)}
    found = [entry for entry in found if entry[3].chain_id not in absorbed]
    covered = {n for _, _, _, state in found for n in state.nodes}
    for node, reason in interpreter.refused_products(covered):
        found.append((None, f"{node.name} {reason}", node, states[node]))
    return found


def _branch_chains(steps) -> set[int]:
    """Chain ids of the branches summed by ``steps`` (nested sums included)."""
    out: set[int] = set()
    for step in steps:
        if isinstance(step, BranchSum):
            out |= step.chains
            for branch in step.branches:
                out |= _branch_chains(branch.steps)
    return out


def _widest_batch(state: ActT, end: fx.Node, states) -> ChainPlan:
    """The plan from the root, or from a later view of it, with the fewest tied feature digits.

    Digits that no weight depends on are batch digits whenever some view on the way puts
    them on the batch side: ``nn.Linear`` applied to ``attn_out.transpose(1, 2)`` is a
    dense ``(1, out, in, 1)`` product over the tokens, not a ``(1, out, in, tokens)``
    factor on the untransposed root (which is not even plannable when the token count is
    symbolic). Of all starts, the one tying the fewest digits that no weight even
    broadcasts along wins; then one without the middle layout (batch digits on both
    sides of the features, two transposing copies around the op), so a weight the user
    expanded along ``d`` stays a tied factor rather than ``d`` becoming a trailing batch
    digit; then the fewest tied digits. Ties keep the earliest root (the largest region).
    When the root does not plan, a later start is taken only if it ties no digit at all;
    otherwise the root's error is raised (and an earlier end is tried).

    The root itself may also be read in the order its memory is laid out: a graph input
    that is a transposed view (``(blocks, batch, features)`` over a batch-first storage,
    which is what a graph cut between two factors hands the next graph, e.g. Dynamo's DDP
    optimizer at a gradient-bucket boundary) has its batch digits in the middle, but a
    permute brings them to the front without copying.
    """

    def attempt(act: ActT, root_order: tuple[int, ...] | None = None) -> ChainPlan:
        plan = plan_chain(act, end, root_order)
        _end_shape_plan(plan)  # symbolic output sizes must be readable from this root
        return plan

    def key(plan: ChainPlan) -> tuple[int, bool, int]:
        return plan.unseen, bool(plan.inner_dims), plan.tied

    best, error = None, None
    try:
        best = attempt(state)
    except (Unsupported, AtomError) as err:
        error = err
    for node in state.nodes:
        if best is not None and key(best) == (1, False, 1):
            break
        view = states.get(node)
        if not isinstance(view, ActT) or view.has_work or view.chain_id != state.chain_id:
            break
        try:
            plan = attempt(reroot(state, node, view))
        except (Unsupported, AtomError):
            continue
        better = key(plan) < key(best) if best is not None else plan.tied == 1  # alone, a later start ties nothing
        if better:
            best = plan
    if best is None or best.tied > 1:
        try:
            order = _stored_order(state.root.meta["val"])
            plan = attempt(state, tuple(order)) if order is not None else None
        except (Unsupported, AtomError):
            plan = None
        if plan is not None and plan.tied < (best.tied if best is not None else 2):
            best = plan
    if best is None:
        raise error
    return best


_PRODUCTS = {aten.mul.Tensor, aten.bmm.default, aten.mm.default, aten.div.Tensor}


def _check_linear_use(plan: ChainPlan, states, origin: fx.Node) -> None:
    """Refuse chains whose output is multiplied by their own input (``x·W·x``, gates on ``x``).

    Such a chain computes one side of a quadratic form: a linear sub-expression, but not
    a layer's linear map; the pass leaves those alone.
    """
    node = plan.end
    while len(node.users) == 1:
        user = next(iter(node.users))
        if user.target not in VIEW_OPS | COPY_OPS and user.target not in (
            aten.permute.default,
            aten.transpose.int,
            aten.t.default,
            aten.unsqueeze.default,
            aten.expand.default,
        ):
            break
        node = user
    for user in node.users:
        if user.target not in _PRODUCTS:
            continue
        for other in user.all_input_nodes:
            state = states.get(other)
            if other is not node and isinstance(state, ActT) and state.root is origin and not state.has_work:
                raise Unsupported(f"{user.name} multiplies the chain's output by its own input (a quadratic form)")


def _hint(size) -> int:
    return int(size.node.hint) if isinstance(size, torch.SymInt) else int(size)


def _stored_order(val: torch.Tensor) -> list[int] | None:
    """The dimension order (outermost first) in which ``val`` is stored, or None when it
    is contiguous; raises :class:`Unsupported` for a layout that is not a permutation of a
    dense tensor."""
    shape, strides = [_hint(s) for s in val.shape], [_hint(s) for s in val.stride()]
    order = sorted(range(len(shape)), key=lambda k: -strides[k])  # stable: ties keep dim order
    expected, dense = 1, {}
    for k in reversed(order):
        dense[k] = expected
        expected *= shape[k]
    if any(shape[k] > 1 and strides[k] != dense[k] for k in range(len(shape))):
        raise Unsupported(f"strides {strides}, not a dense layout")
    contiguous = [math.prod(shape[k + 1 :]) for k in range(len(shape))]
    if all(shape[k] == 1 or strides[k] == contiguous[k] for k in range(len(shape))):
        return None
    return order


def _end_layout(plan: ChainPlan) -> list[int] | None:
    """The dimension order (outermost first) in which the end's traced value is stored,
    or None when it is contiguous.

    The op's output is contiguous, but the ops after the chain were traced against the
    end's recorded strides (a later ``view`` may only be valid on them, e.g. after a
    ``transpose`` and an elementwise op that keeps its input's layout), so the rewrite
    restores that layout. Layouts that are not a permutation of a dense tensor are refused.
    """
    try:
        return _stored_order(plan.end.meta["val"])
    except Unsupported as err:
        raise Unsupported(f"the chain's output {plan.end.name} has {err}") from None


def _check_dtypes(plan: ChainPlan) -> None:
    """The op computes in one floating dtype on one device: input, values, bias and output."""
    root, end = plan.root.meta["val"], plan.end.meta["val"]
    dtype = plan.cast or root.dtype
    sources = [term.source.meta["val"] for v in plan.values for term in v.terms()]
    if plan.bias is not None:
        sources.append(plan.bias.source.meta["val"])
    if not root.dtype.is_floating_point or dtype != end.dtype:
        raise Unsupported(f"the chain maps {dtype} to {end.dtype}")
    for val in sources:
        if val.dtype != dtype or val.device != root.device:
            raise Unsupported(f"weights in {val.dtype} on {val.device} but activations in {dtype} on {root.device}")


def _check_no_mutation(plan: ChainPlan, order: dict) -> None:
    """The op reads its inputs where the chain ends: nothing they alias may be mutated before."""
    ancestors, stack = set(), [plan.end]
    while stack:
        node = stack.pop()
        if node not in ancestors:
            ancestors.add(node)
            stack.extend(node.all_input_nodes)
    start = min(order[n] for n in plan.nodes) if plan.nodes else order[plan.end]
    for node in ancestors | set(_window(plan.end, start, order)):
        target = node.target
        if not isinstance(target, torch._ops.OpOverload) or not target._schema.is_mutable:
            continue
        if order[node] < start or node in plan.nodes:
            continue
        written = [
            a
            for a, arg in zip(node.args, target._schema.arguments, strict=False)
            if arg.alias_info is not None and arg.alias_info.is_write
        ]
        if any(isinstance(a, fx.Node) and a in ancestors for a in written):
            raise Unsupported(f"{node.name} mutates an input of the chain in place")


def _window(end: fx.Node, start: int, order: dict):
    node = end
    while node.op != "root" and order.get(node, -1) >= start:
        yield node
        node = node.prev


def run_pass(
    gm: fx.GraphModule,
    weights: set[fx.Node],
    known: dict[fx.Node, torch.Tensor],
    learnable: set[fx.Node],
    mode: str = "auto",
    device_type: str = "cpu",
    refuse: str | None = None,
    inline: bool = False,
) -> list[ChainReport]:
    """Detect, decide, verify and rewrite ``gm`` in place; returns the reports.

    ``refuse``: a reason that holds for the whole graph; chains are reported, not rewritten.
    ``inline``: on a CPU the caller inlines the op as aten ops (:data:`INLINE_ON_CPU`),
    which the cost model weighs instead of the opaque op.
    Dead code goes first: a user with no path to an output (a probe that only reads a
    dtype, say) computes nothing the graph returns, so it must not end a chain.
    """
    drop_dead_code(gm)
    reports = []
    accepted: list[ChainPlan] = []
    for plan, reason, end, state in find_chains(gm, weights, known):
        names = [n.name for n in state.nodes]
        if plan is None:
            report = ChainReport([], [], False, f"not a KS chain: {reason}", names, state.root.name, end.name)
            _debug("ksfx: chain %s -> %s not rewritten: %s", state.root.name, end.name, report.reason)
            reports.append(report)
            continue
        chain = plan.chain
        est = estimate(chain, plan.source_flops)
        ok, why = decide(chain, est, mode, device_type, inline)
        if ok and refuse:
            ok, why = False, refuse
        status, message = ("", "")
        if ok:
            try:
                status, message = verify(plan, learnable, known, gm)
            except Exception as err:  # noqa: BLE001 - refuse this chain only, keep the others
                log.debug("ksfx: checking %s -> %s raised", plan.root.name, plan.end.name, exc_info=True)
                status, message = "failed", f"re-evaluating the region raised {type(err).__name__}: {err}"
            if status == "failed":
                ok, why = False, f"refused: {message}"
        report = ChainReport(
            patterns=[p.as_tuple() for p in chain.patterns],
            permutations=[str(p) for p in chain.permutations],
            rewritten=ok,
            reason=why,
            nodes=[n.name for n in plan.nodes],
            root=plan.root.name,
            end=plan.end.name,
            batch_last=plan.batch_last,
            chain=str(chain),
            estimate=est,
            verification=message,
            plan=plan,
            stopped=reason,
        )
        _debug(
            "ksfx: chain %s -> %s = %s (%s): %s [%s]",
            plan.root.name,
            plan.end.name,
            chain,
            "batch-last" if plan.batch_last else "batch-first",
            "REWRITTEN" if ok else "kept",
            why,
        )
        reports.append(report)
        if ok:
            accepted.append(plan)
    if accepted:
        apply(gm, accepted)
    return reports


def drop_dead_code(gm: fx.GraphModule) -> None:
    """Remove what reaches no output, in-place ops on unused temporaries included."""
    gm.graph.eliminate_dead_code(_is_impure)


def chain_roots(gm: fx.GraphModule, weights: set[fx.Node], known: dict[fx.Node, torch.Tensor]):
    """``[(root, feature dimensions of the root)]`` for every chain found (dead code dropped first)."""
    drop_dead_code(gm)
    return [(plan.root, plan.root_feature_dims) for plan, _, _, _ in find_chains(gm, weights, known) if plan]


def _is_impure(node: fx.Node) -> bool:
    """``node.is_impure()``, except for an in-place op on a temporary nothing else reads.

    ``x @ v`` with a 1-D operand decomposes to ``mm`` then ``squeeze_``: the in-place
    squeeze of a fresh, otherwise unused product is dead when its result is.
    """
    if not node.is_impure():
        return False
    target = node.target
    if node.op != "call_function" or not isinstance(target, torch._ops.OpOverload):
        return True
    written = [
        arg
        for arg, schema in zip(node.args, target._schema.arguments, strict=False)
        if schema.alias_info is not None and schema.alias_info.is_write
    ]
    return not written or not all(_private_temporary(arg, node) for arg in written)


def _private_temporary(arg, user: fx.Node) -> bool:
    """``arg`` is a fresh tensor (aliasing no other) that only ``user`` reads."""
    if not isinstance(arg, fx.Node) or arg.op != "call_function" or set(arg.users) != {user}:
        return False
    target = arg.target
    if not isinstance(target, torch._ops.OpOverload) or target._schema.is_mutable:
        return False
    return all(ret.alias_info is None for ret in target._schema.returns)


# ----------------------------------------------------------------------------- graph surgery
def apply(gm: fx.GraphModule, plans: list[ChainPlan]) -> None:
    graph = gm.graph
    order = {node: k for k, node in enumerate(graph.nodes)}
    replaced: dict[fx.Node, fx.Node] = {}
    for plan in sorted(plans, key=lambda p: order[p.end]):
        chain = plan.chain
        root = replaced.get(plan.root, plan.root)
        with graph.inserting_before(plan.end):
            fin, fout = chain.in_features, chain.out_features
            x = root
            if plan.root_order is not None:  # read in storage order: a view, no copy
                x = graph.call_function(aten.permute.default, (root, list(plan.root_order)))
            inner = _inner_size(graph, plan, root) if plan.inner_dims else None
            if plan.inner_dims:  # (outer, in, inner) -> (in, outer * inner): batch-last
                x3 = graph.call_function(aten.reshape.default, (x, [-1, fin, inner]))
                x3 = graph.call_function(aten.permute.default, (x3, [1, 0, 2]))
                x2d = graph.call_function(aten.reshape.default, (x3, [fin, -1]))
            else:
                x2d = graph.call_function(aten.reshape.default, (x, [fin, -1] if plan.batch_last else [-1, fin]))
            if plan.cast is not None:
                x2d = graph.call_function(aten._to_copy.default, (x2d,), {"dtype": plan.cast})
            values = [
                _build(gm, spec, pattern.as_tuple()) for spec, pattern in zip(plan.values, chain.patterns, strict=True)
            ]
            bias = _build(gm, plan.bias, (chain.out_features,)) if plan.bias is not None else None
            dense = sum(1 << k for k, source in enumerate(plan.values) if source.dense)
            y2d = graph.call_function(
                torch.ops.ksfx.ks_chain.default, (x2d, values, chain.to_spec(), plan.batch_last, bias, dense)
            )
            if plan.inner_dims:  # back to (outer, out, inner), contiguous like the traced end
                y3 = graph.call_function(aten.reshape.default, (y2d, [fout, -1, inner]))
                y3 = graph.call_function(aten.permute.default, (y3, [1, 0, 2]))
                y2d = graph.call_function(aten.clone.default, (y3,), {"memory_format": torch.contiguous_format})
            y = graph.call_function(aten.reshape.default, (y2d, _end_shape(graph, plan, root)))
            layout = _end_layout(plan)
            if layout is not None:
                stored = graph.call_function(aten.permute.default, (y, layout))
                stored = graph.call_function(aten.clone.default, (stored,), {"memory_format": torch.contiguous_format})
                inverse = sorted(range(len(layout)), key=layout.__getitem__)
                y = graph.call_function(aten.permute.default, (stored, inverse))
        plan.end.replace_all_uses_with(y)
        replaced[plan.end] = y
        for node in reversed(plan.nodes):  # out= products are impure: dead-code elimination keeps them
            if not node.users and node is not plan.root:
                graph.erase_node(node)
    graph.eliminate_dead_code()
    graph.lint()
    gm.recompile()


def _inner_size(graph: fx.Graph, plan: ChainPlan, root: fx.Node):
    """The product of the root's last ``plan.inner_dims`` sizes; symbolic ones read from ``root``."""
    shape = plan.root.meta["val"].shape
    order = plan.root_order or tuple(range(len(shape)))  # the root is read in this order
    value = 1
    for k in order[len(order) - plan.inner_dims :]:
        size = shape[k] if isinstance(shape[k], int) else graph.call_function(aten.sym_size.int, (root, k))
        if isinstance(size, int) and isinstance(value, int):
            value *= size
        else:
            value = graph.call_function(operator.mul, (value, size))
    return value


def _end_shape_plan(plan: ChainPlan) -> list:
    """The end node's shape as ints, ``-1``, or for each symbolic dimension (when there are
    several) the list of its factors: ints and indices of root dimensions read at run time.

    Raises :class:`AtomError` when a symbolic size is not a whole dimension of the root;
    ``find_chains`` calls it so that such a chain is refused before any graph surgery.
    """
    root_dims = {}
    for k, size in enumerate(plan.root.meta["val"].shape):
        root_dims.setdefault(str(size), k)
    shape = [size if isinstance(size, int) else None for size in plan.end.meta["val"].shape]
    symbolic = [k for k, s in enumerate(shape) if s is None]
    if len(symbolic) <= 1:
        return [-1 if s is None else s for s in shape]
    for k in symbolic:
        factors = []
        for atom in leaves(plan.end_dims[k]):
            if atom.static:
                factors.append(atom.int_size())
                continue
            dim = root_dims.get(str(_sym_of(plan.root, atom)))
            if dim is None:
                raise AtomError(f"cannot express the symbolic size {atom.size} at run time")
            factors.append(("root_dim", dim))
        shape[k] = factors
    return shape


def _end_shape(graph: fx.Graph, plan: ChainPlan, root: fx.Node) -> list:
    """The end node's shape; symbolic sizes are read from the root at run time."""
    shape = _end_shape_plan(plan)
    for k, size in enumerate(shape):
        if not isinstance(size, list):
            continue
        factors = [graph.call_function(aten.sym_size.int, (root, f[1])) if isinstance(f, tuple) else f for f in size]
        value = factors[0]
        for f in factors[1:]:
            value = graph.call_function(operator.mul, (value, f))
        shape[k] = value
    return shape


def _sym_of(root: fx.Node, atom) -> object:
    for size in root.meta["val"].shape:
        if not isinstance(size, int) and str(size.node.expr) == str(atom.size):
            return size
    return None


def _build(gm: fx.GraphModule, spec: ValueSource, shape: tuple[int, ...]) -> fx.Node:
    """Values as a view of the source when the ids allow it, else a constant-index gather."""
    graph = gm.graph
    if spec.plus:  # a factor summed from branches: one gather per source, added
        node = _build(gm, replace(spec, plus=()), shape)
        for term in spec.plus:
            node = graph.call_function(aten.add.Tensor, (node, _build(gm, term, shape)))
        return node
    ids = spec.ids.reshape(shape)
    source = spec.source
    if _same_shape_product(source):  # (w * mask)[idx] == w[idx] * mask[idx]: no dense product per call
        left, right = (_build(gm, ValueSource(arg, spec.ids), shape) for arg in source.args[:2])
        return graph.call_function(aten.mul.Tensor, (left, right))
    numel = 1
    for s in source.meta["val"].shape:
        numel *= int(s)
    if bool((ids > 0).all()):
        view = _as_view(ids - 1, numel)
        if view is not None:
            offset, base_shape, order, expand = view
            node = source
            if offset or math.prod(base_shape) != numel:
                flat = graph.call_function(aten.reshape.default, (source, [-1]))
                node = graph.call_function(aten.slice.Tensor, (flat, 0, offset, offset + math.prod(base_shape)))
            node = graph.call_function(aten.reshape.default, (node, base_shape))
            if order != list(range(len(order))):
                node = graph.call_function(aten.permute.default, (node, order))
            if expand:
                node = graph.call_function(aten.expand.default, (node, list(shape)))
            return node
    flat = graph.call_function(aten.reshape.default, (source, [-1]))
    index = ids - 1
    if not bool((ids > 0).all()):
        flat = graph.call_function(aten.constant_pad_nd.default, (flat, [1, 0], 0.0))
        index = ids
    name = _constant(gm, index.to(source.meta["val"].device))
    return graph.call_function(aten.index.Tensor, (flat, [graph.get_attr(name)]))


def _same_shape_product(node: fx.Node) -> bool:
    if node.target is not aten.mul.Tensor or len(node.args) != 2 or node.kwargs:
        return False
    shapes = [getattr(a, "meta", {}).get("val") for a in node.args]
    out = node.meta["val"]
    return all(isinstance(v, torch.Tensor) and v.shape == out.shape and v.dtype == out.dtype for v in shapes)


def _constant(gm: fx.GraphModule, tensor: torch.Tensor) -> str:
    """A constant index buffer on ``gm``, shared with an equal one registered before."""
    k = 0
    while hasattr(gm, f"_ksfx_index_{k}"):
        existing = getattr(gm, f"_ksfx_index_{k}")
        if existing.shape == tensor.shape and existing.device == tensor.device and torch.equal(existing, tensor):
            return f"_ksfx_index_{k}"
        k += 1
    name = f"_ksfx_index_{k}"
    gm.register_buffer(name, tensor)
    return name


def _as_view(index: torch.Tensor, numel: int):
    """``(offset, base_shape, permutation, needs_expand)`` when ``index`` is a dense strided view.

    ``index[i] = offset + Σ stride_k · i_k`` with the nonzero strides forming a row-major
    layout of a contiguous range of the source (any order); stride-0 axes are
    broadcasts (tied values).
    """
    shape = list(index.shape)
    flat = index.reshape(-1)
    if flat.numel() == 0:
        return None
    offset = int(flat[0])
    index = index - offset
    strides = []
    for k, size in enumerate(shape):
        if size == 1:
            strides.append(0)
            continue
        unit = [0] * len(shape)
        unit[k] = 1
        strides.append(int(index[tuple(unit)]))
    grid = torch.zeros(shape, dtype=torch.long)
    for k, (size, stride) in enumerate(zip(shape, strides, strict=True)):
        view = [1] * len(shape)
        view[k] = size
        grid = grid + stride * torch.arange(size).reshape(view)
    if not torch.equal(grid, index) or min(strides) < 0:  # a reversed axis is no forward view: gather
        return None
    moving = sorted((k for k in range(len(shape)) if strides[k] > 0), key=lambda k: -strides[k])
    expected = 1
    for k in reversed(moving):
        if strides[k] != expected:
            return None
        expected *= shape[k]
    if offset + expected > numel:
        return None
    still = [k for k in range(len(shape)) if strides[k] == 0]
    base_shape = [shape[k] for k in moving] + [1] * len(still)
    position = {k: p for p, k in enumerate(moving + still)}
    order = [position[k] for k in range(len(shape))]
    expand = any(strides[k] == 0 and shape[k] > 1 for k in range(len(shape)))
    return offset, base_shape, order, expand
