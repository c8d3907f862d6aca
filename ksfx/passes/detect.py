"""Abstract interpretation of an aten graph over index atoms.

Every tensor node gets a state:

* :class:`~ksfx.passes.weights.WeightT` — computed from parameters, buffers and
  constants only (its element ids are known, its values are read at run time);
* :class:`ActT` — a linear image of a *root* activation node through the ops the pass
  understands: views, permutations by constant index tables, products with weights and
  sums over digits (``bmm``/``mm``/``addmm``, broadcast ``mul`` then ``sum``, which is
  what ``einsum``, ``matmul`` and ``F.linear`` lower to; grouped 1x1 convolutions), sums
  of such branches of one tensor (``w1 * x + w2 * x[..., perm]``), and a bias ``add``.
  It records the steps (:class:`Factor`, :class:`PermRec`, :class:`BranchSum`) between
  the root and itself.

A bias ends a chain *segment*: the op takes the bias as its epilogue, so an op after the
bias that is more than a view (a product, a permutation) starts a new chain rooted at the
node that added the bias, with the views in between replayed from there.

Any node the pass does not understand becomes a new root, so nothing is ever assumed.
A node whose result is used more than once ends every chain through it (its users
restart from it), unless all its users are branches that an ``add`` sums back into one
linear map of it. Contractions between two activations (attention) are never factors.
"""

from __future__ import annotations

import itertools
import logging
import operator
from dataclasses import dataclass, field, replace

import sympy
import torch
import torch.fx as fx

from ksfx.passes.atoms import Atom, AtomError, align, leafset, leaves, prod_size, regroup, size_expr
from ksfx.passes.weights import (
    DATA_MOVEMENT,
    ZERO_PRESERVING_UNARY,
    ValueEvaluator,
    WeightT,
    fresh_dims,
    from_ids,
    new_source,
)

log = logging.getLogger("ksfx.passes")
aten = torch.ops.aten
_chain_ids = itertools.count()

VIEW_OPS = {aten.view.default, aten._unsafe_view.default, aten.reshape.default}
COPY_OPS = {aten.clone.default, aten.alias.default, aten.contiguous.default}
#: Ops that only move or broadcast indices: tracked the same way for weights and activations.
LAYOUT_OPS = (
    VIEW_OPS
    | COPY_OPS
    | {
        aten.permute.default,
        aten.transpose.int,
        aten.t.default,
        aten.unsqueeze.default,
        aten.squeeze.dim,
        aten.squeeze.dims,
        aten.squeeze.default,
        aten.expand.default,
    }
)


@dataclass(frozen=True, eq=False)
class Factor:
    """One product with a weight: ``y = Σ_summed x · w`` (a KS factor up to permutations)."""

    weight: WeightT  # a fresh copy whose atoms are unified with the activation's
    live_before: tuple[Atom, ...]  # digits the activation depended on before the product
    node: fx.Node
    summed: tuple[Atom, ...] = ()
    out_dims: tuple | None = None  # activation dims when the factor closed (orders new digits)
    # Split from a product by an outer-product weight: the first part carries the original
    # product (whose FLOPs the source pays), the second only says it is a part.
    whole: Factor | None = None
    rest_of_split: bool = False


@dataclass(frozen=True, eq=False)
class PermRec:
    """Digits ``src`` replaced by digits ``new``: ``flat(new) = j`` reads ``flat(src) = table[j]``.

    A constant index table along one dimension (``x[..., perm]``), or the identity when a
    reshape reads a flat feature index with digits that do not refine the current ones
    (e.g. ``(2, 3, 2)`` read as ``(3, 4)``).
    """

    src: tuple[Atom, ...]
    table: torch.Tensor
    new: tuple[Atom, ...]
    node: fx.Node
    guards: frozenset = frozenset()


@dataclass(frozen=True, eq=False)
class BranchSum:
    """``y = Σ_k branch_k(x)``: linear images of one tensor, added (a butterfly's two branches).

    Each branch is a closed :class:`ActT` rooted at that tensor, its root digits unified
    with the chain's, so its steps read the chain's feature space. ``dims`` are the sum's:
    digits both branches pass through in place are kept, the others replaced by fresh
    digits (``consumed`` are the input digits that do not reach the sum). ``chains``: the
    branches' own chain ids, which a planned sum absorbs.
    """

    branches: tuple  # of ActT
    dims: tuple[tuple[Atom, ...], ...]
    consumed: tuple[Atom, ...]
    node: fx.Node
    chains: frozenset = frozenset()


@dataclass(frozen=True, eq=False)
class ActT:
    dims: tuple[tuple[Atom, ...], ...]
    root: fx.Node
    root_dims: tuple[tuple[Atom, ...], ...]
    live: tuple[Atom, ...]
    chain_id: int
    steps: tuple = ()
    pending: Factor | None = None
    bias: WeightT | None = None
    bias_node: fx.Node | None = None  # where the bias was added: the root of the next segment
    nodes: tuple[fx.Node, ...] = ()
    cast: torch.dtype | None = None  # a dtype cast of the input before any product (autocast)

    @property
    def has_work(self) -> bool:
        return bool(self.steps) or self.pending is not None

    def closed(self) -> ActT:
        if self.pending is None:
            return self
        factor = replace(self.pending, out_dims=self.dims)
        return replace(self, steps=self.steps + _split_outer(factor), pending=None)


#: Products: one that multiplies by a weight and cannot be followed is reported with its reason.
PRODUCT_OPS = {
    aten.mm.default,
    aten.bmm.default,
    aten.addmm.default,
    aten.mm.out,
    aten.bmm.out,
    aten.convolution.default,
}


class Unsupported(Exception):
    """The op cannot continue this activation's chain."""


def _root(node: fx.Node) -> ActT:
    dims = fresh_dims(node.meta["val"], node)
    return ActT(dims, node, dims, tuple(a for d in dims for a in d), next(_chain_ids))


def _is_size(node: fx.Node) -> bool:
    return isinstance(node.meta.get("val"), torch.SymInt)


def _shape(node: fx.Node) -> list:
    return [size_expr(s) for s in node.meta["val"].shape]


def _norm(dim: int, ndim: int) -> int:
    return dim + ndim if dim < 0 else dim


@dataclass
class Detection:
    """States of every node after interpretation."""

    states: dict[fx.Node, object] = field(default_factory=dict)
    evaluator: ValueEvaluator | None = None


class Interpreter:
    def __init__(self, gm: fx.GraphModule, weights: set[fx.Node], known: dict[fx.Node, torch.Tensor]) -> None:
        self.gm = gm
        self.weights = weights
        self.evaluator = ValueEvaluator(gm, known)
        self.states: dict[fx.Node, object] = {}
        self.failures: dict[fx.Node, str] = {}  # why a node could not continue a chain
        # States of the views after a bias, replayed in a new segment: committed only when
        # the op that needed the new segment is understood.
        self._replayed: dict[fx.Node, ActT] = {}
        self._order = {node: k for k, node in enumerate(gm.graph.nodes)}

    # ------------------------------------------------------------------ driver
    def run(self) -> dict[fx.Node, object]:
        for node in self.gm.graph.nodes:
            try:
                self.states[node] = self._visit(node)
            except (AtomError, Unsupported) as err:
                log.debug("ksfx: %s starts a new chain root (%s)", node.name, err)
                self.failures[node] = str(err)
                self.states[node] = self._fallback(node)
        return self.states

    def refused_products(self, covered: set[fx.Node]) -> list[tuple[fx.Node, str]]:
        """``(node, reason)`` for each product with a weight that no chain covers.

        Such a product is invisible otherwise (it only restarts a chain root); the reason
        is the first failure on the way from the weight, e.g. a view to a symbolic shape.
        """
        refused = []
        for node, error in self.failures.items():
            if node.target not in PRODUCT_OPS or node in covered:
                continue
            if node.target is aten.convolution.default and node.args[8] == 1:
                continue  # a dense convolution (a 3x3 conv, a ViT patch embedding) is expected to stay
            for arg in node.all_input_nodes:
                path_error, source = None, arg
                while not isinstance(self.states.get(source), WeightT) and source.target in LAYOUT_OPS:
                    if source in self.failures:  # the last one seen is the closest to the weight
                        path_error = f"{source.name}: {self.failures[source]}"
                    source = source.args[0]
                if isinstance(self.states.get(source), WeightT):
                    while source.target in LAYOUT_OPS and isinstance(self.states.get(source.args[0]), WeightT):
                        source = source.args[0]  # name the parameter, not a view of it
                    reason = path_error or f"{node.name}: {error}"
                    refused.append((node, f"multiplies by the weight {source.name} but is not followed ({reason})"))
                    break
        return refused

    def _fallback(self, node: fx.Node):
        val = node.meta.get("val")
        if isinstance(val, torch.Tensor) and node.op != "output":
            return _root(node)
        return None

    def _visit(self, node: fx.Node):
        if node.op == "placeholder":
            val = node.meta.get("val")
            if node in self.weights and isinstance(val, torch.Tensor):
                value = self.evaluator.known.get(node)
                if value is not None and (value.is_floating_point() or value.dtype == torch.bool):
                    support = (value != 0).cpu()  # frozen weights and masks: guarded at run time
                    if not bool(support.all()):
                        return new_source(node, val, support, {node})
                return new_source(node, val, None)
            return self._fallback(node)
        if node.op == "get_attr":
            val = node.meta.get("val")
            value = getattr(self.gm, node.target)
            if isinstance(value, torch.Tensor):
                return new_source(node, value if val is None else val, None)
            return None
        if node.op != "call_function":
            return self._fallback(node)
        if node.target is operator.getitem:
            parent = self.states.get(node.args[0])
            if isinstance(parent, list | tuple):
                return parent[node.args[1]]
            return self._fallback(node)
        inputs = [self.states.get(n) for n in node.all_input_nodes]
        if any(isinstance(s, ActT) for s in inputs):
            return self._activation(node)
        if inputs and all(isinstance(s, WeightT | list | tuple) for s in inputs):
            return self._weight(node)
        sizes = node.all_input_nodes[1:]
        if node.target in LAYOUT_OPS and isinstance(inputs[0], WeightT) and all(map(_is_size, sizes)):
            return self._weight(node)  # a weight viewed or broadcast with sizes read at run time
        if not inputs and isinstance(node.meta.get("val"), torch.Tensor):
            return self._weight(node)
        if any(isinstance(s, WeightT) for s in inputs):
            others = [n.name for n, s in zip(node.all_input_nodes, inputs, strict=True) if not isinstance(s, WeightT)]
            self.failures[node] = f"a weight combined with run-time values ({', '.join(others)}, e.g. symbolic sizes)"
        return self._fallback(node)

    # ------------------------------------------------------------------ weights
    def _weight(self, node: fx.Node):
        target, val = node.target, node.meta.get("val")
        args = node.args
        if target in LAYOUT_OPS:
            w: WeightT = self.states[args[0]]
            try:
                return replace(w, dims=self._view_dims(node, w.dims))
            except AtomError:  # not a digit regrouping: move the ids themselves
                return from_ids(node, val, node.target(w.dense_ids(), *args[1:]), w.source, w.guards)
        if target in DATA_MOVEMENT:
            return self._data_movement(node)
        if not isinstance(val, torch.Tensor) or not all(isinstance(s, int) for s in val.shape):
            raise Unsupported(f"{node.name}: weight op without a static tensor result")
        if target in ZERO_PRESERVING_UNARY:
            w = self.states[args[0]]
            return new_source(node, val, w.dense_ids() != 0, w.guards)
        if target is aten.mul.Tensor and len(node.all_input_nodes) == 2:
            supports, guards = [], set()
            for operand in args[:2]:
                w = self.states[operand]
                support = w.dense_ids() != 0
                try:
                    nonzero = (self.evaluator.value(operand) != 0).cpu()
                except AtomError:  # not a constant: only its structural zeros count
                    nonzero = None
                if nonzero is not None and not bool(nonzero.all()):
                    support = support & nonzero
                    guards |= self.evaluator.guards_of(operand)
                guards |= w.guards
                supports.append(support)
            support = torch.broadcast_to(supports[0] & supports[1], tuple(val.shape))
            product = new_source(node, val, support, guards)
            if bool(support.all()):
                try:
                    return replace(product, parts=_outer_parts(product, [self.states[a] for a in args[:2]]))
                except AtomError:  # an operand too large or symbolic to read: a plain dense weight
                    pass
            return product
        if target in (aten.mul.Tensor, aten.div.Tensor) and len(node.all_input_nodes) == 1:
            w = self.states[node.all_input_nodes[0]]
            return new_source(node, val, w.dense_ids() != 0, w.guards)
        return new_source(node, val, None)

    def _data_movement(self, node: fx.Node):
        """Run the op on id tensors (same source) or on supports (mixed sources)."""
        sources, guards = set(), set()

        def ids_of(arg):
            state = self.states.get(arg)
            if isinstance(state, WeightT):
                sources.add(state.source)
                guards.update(state.guards)
                return state.dense_ids()
            value = self.evaluator.value(arg)  # index tensors must be constants
            guards.update(self.evaluator.guards_of(arg))
            return value

        args = fx.node.map_arg(node.args, ids_of)
        kwargs = fx.node.map_arg(node.kwargs, ids_of)
        if node.target is aten.constant_pad_nd.default and len(args) > 2 and args[2] != 0:
            raise Unsupported("padding with a nonzero value")
        out = node.target(*args, **kwargs)
        vals = node.meta["val"]
        if len(sources) == 1:
            source = next(iter(sources))
            if isinstance(out, list | tuple):
                return [from_ids(node, v, o, source, guards) for v, o in zip(vals, out, strict=True)]
            return from_ids(node, vals, out, source, guards)
        if isinstance(out, list | tuple):
            raise Unsupported("multi-output op over several weights")
        return new_source(node, vals, out != 0, guards)

    # ------------------------------------------------------------------ activations
    def _act_input(self, arg: fx.Node, restart: bool, segment: bool = True) -> ActT:
        """The state ``arg``'s chain continues with; ``segment``: past a bias, a new segment."""
        state = self.states.get(arg)
        if not isinstance(state, ActT):
            raise Unsupported(f"{arg.name} is not an activation")
        if restart or len(arg.users) > 1:
            return _root(arg)
        return self._segment(state) if segment else state

    def _segment(self, act: ActT) -> ActT:
        """``act`` as a new chain rooted where its bias was added (``act`` itself without a bias).

        ``K1 x + b1`` then ``K2 (...)``: the first chain ends at the bias (its epilogue), the
        second starts there. Only views can follow a bias in one segment, so they are
        replayed on the new root's digits; the views' states move to the new chain once
        the op that needed it is understood (see :meth:`_activation`).
        """
        if act.bias is None:
            return act
        start = act.bias_node
        seg = _root(start)
        for node in act.nodes[act.nodes.index(start) + 1 :]:
            seg = replace(seg, dims=self._view_dims(node, seg.dims), nodes=seg.nodes + (node,))
            self._replayed[node] = seg
        return seg

    def _activation(self, node: fx.Node):
        last_error = None
        for restart in (False, True):
            self._replayed = {}
            try:
                result = self._activation_op(node, restart)
            except (AtomError, Unsupported) as err:
                last_error = err
                continue
            self.states.update(self._replayed)
            if isinstance(result, ActT):
                return replace(result, nodes=result.nodes + (node,))
            return result
        raise Unsupported(str(last_error))

    def _activation_op(self, node: fx.Node, restart: bool):
        target, args = node.target, node.args
        acts = [n for n in node.all_input_nodes if isinstance(self.states.get(n), ActT)]
        if target is aten.add.Tensor and len(acts) == 2 and len(set(acts)) == 2:
            return self._branch_sum(node)
        if len(set(acts)) != 1 or sum(1 for a in _flat_nodes(args) if a is acts[0]) != 1:
            raise Unsupported("an op between two activations (or reusing one) is never a KS factor")
        x = acts[0]
        if target in LAYOUT_OPS:
            if args[0] is not x:
                raise Unsupported("view of a non-activation argument")
            act = self._act_input(x, restart, segment=False)
            try:
                return replace(act, dims=self._view_dims(node, act.dims))
            except AtomError:
                if target not in VIEW_OPS:
                    raise
                return self._reindex_view(node, self._segment(act))
        if target is aten._to_copy.default:
            return self._cast(node, self._act_input(x, restart))
        if target in (aten.index.Tensor, aten.index_select.default):
            return self._index(node, self._act_input(x, restart))
        if target is aten.flip.default:
            return self._flip(node, self._act_input(x, restart))
        if target in (aten.mm.default, aten.bmm.default):
            return self._matmul(node, args[0], args[1], x, restart)
        if target in (aten.mm.out, aten.bmm.out):
            _check_scratch_out(node.kwargs.get("out"), x)
            return self._matmul(node, args[0], args[1], x, restart)
        if target is aten.addmm.default:
            if node.kwargs.get("beta", 1) != 1 or node.kwargs.get("alpha", 1) != 1:
                raise Unsupported("addmm with beta/alpha")
            act = self._matmul(node, args[1], args[2], x, restart)
            return self._add_bias(node, act.closed(), args[0])
        if target is aten.convolution.default:
            return self._convolution(node, x, restart)
        if target is aten.mul.Tensor:
            other = args[1] if args[0] is x else args[0]
            return self._mul(node, self._act_input(x, restart), other)
        if target is aten.sum.dim_IntList:
            return self._sum(node, self._act_input(x, restart))
        if target is aten.add.Tensor:
            if node.kwargs.get("alpha", 1) != 1:
                raise Unsupported("add with alpha")
            other = args[1] if args[0] is x else args[0]
            return self._add_bias(node, self._act_input(x, restart).closed(), other)
        raise Unsupported(f"{target} is not tracked")

    def _weight_arg(self, arg) -> WeightT:
        state = self.states.get(arg) if isinstance(arg, fx.Node) else None
        if not isinstance(state, WeightT):
            raise Unsupported(f"{arg} is not a weight")
        return state.fresh()

    def _view_dims(self, node: fx.Node, dims):
        target, args = node.target, node.args
        ndim = len(dims)
        if target in VIEW_OPS:
            flat = [a for d in dims for a in d]
            return regroup(flat, _shape(node))
        if target in COPY_OPS:
            return dims
        if target is aten.permute.default:
            return tuple(dims[_norm(p, ndim)] for p in args[1])
        if target is aten.transpose.int:
            d0, d1 = _norm(args[1], ndim), _norm(args[2], ndim)
            out = list(dims)
            out[d0], out[d1] = out[d1], out[d0]
            return tuple(out)
        if target is aten.t.default:
            return tuple(reversed(dims)) if ndim == 2 else dims
        if target is aten.unsqueeze.default:
            out = list(dims)
            out.insert(_norm(args[1], ndim + 1), ())
            return tuple(out)
        if target in (aten.squeeze.dim, aten.squeeze.dims, aten.squeeze.default):
            if target is aten.squeeze.default:
                drop = {k for k, d in enumerate(dims) if not d}
            else:
                raw = args[1] if target is aten.squeeze.dims else [args[1]]
                drop = {_norm(k, ndim) for k in raw if not dims[_norm(k, ndim)]}
            return tuple(d for k, d in enumerate(dims) if k not in drop)
        if target is aten.expand.default:
            shape = _shape(node)
            lead = len(shape) - ndim
            out = []
            for k, size in enumerate(shape):
                old = dims[k - lead] if k >= lead else ()
                if old or size == 1:
                    out.append(old)
                else:
                    out.append((Atom(size, source=(node, k)),))
            return tuple(out)
        raise Unsupported(f"{target} is not a view")

    def _cast(self, node: fx.Node, act: ActT) -> ActT:
        """``x.to(dtype)`` before the first product (autocast casts the bmm operands): the op
        then runs on the cast input, as the original products did."""
        dtype = node.kwargs.get("dtype")
        others = {k: v for k, v in node.kwargs.items() if k != "dtype" and v is not None}
        device = others.pop("device", None)
        val = node.meta.get("val")
        if (
            len(node.args) != 1
            or others
            or not isinstance(dtype, torch.dtype)
            or not dtype.is_floating_point
            or (device is not None and isinstance(val, torch.Tensor) and torch.device(device) != val.device)
        ):
            raise Unsupported("a copy that changes more than the floating dtype")
        if act.has_work or act.cast is not None:
            raise Unsupported("a dtype cast after a product (the op computes in one dtype)")
        return replace(act, cast=dtype)

    def _index(self, node: fx.Node, act: ActT) -> ActT:
        if node.target is aten.index_select.default:
            dim, index = _norm(node.args[1], len(act.dims)), node.args[2]
        else:
            indices = list(node.args[1])
            used = [k for k, i in enumerate(indices) if i is not None]
            if len(used) != 1:
                raise Unsupported("indexing with several index tensors")
            dim, index = used[0], indices[used[0]]
        if not isinstance(index, fx.Node):
            raise Unsupported("index is not a tensor")
        table = self.evaluator.value(index)
        table = table.detach().cpu().to(torch.long).reshape(-1) if table.ndim == 1 else None
        return self._permute_dim(node, act, dim, table, self.evaluator.guards_of(index))

    def _flip(self, node: fx.Node, act: ActT) -> ActT:
        """``x.flip(dims)``: the reversal of each dimension's index (the butterfly pairing of
        ``x.view(..., n // (2 * s), 2, s).flip(-2)``)."""
        for dim in node.args[1]:
            dim = _norm(dim, len(act.dims))
            size = prod_size(act.dims[dim])
            if not size.is_Integer:
                raise Unsupported("flip of a symbolic dimension")
            act = self._permute_dim(node, act, dim, torch.arange(int(size) - 1, -1, -1), frozenset())
        return act

    def _permute_dim(self, node: fx.Node, act: ActT, dim: int, table, guards) -> ActT:
        """Dimension ``dim`` read through ``table`` (``out[j] = in[table[j]]``): a new digit."""
        size = act.dims[dim]
        n = 1
        for atom in leaves(size):
            n *= atom.int_size()
        if table is None or table.numel() != n or not torch.equal(table.sort().values, torch.arange(n)):
            raise Unsupported("index table is not a permutation of its dimension")
        if not leafset(size) <= leafset(act.live):
            raise Unsupported("permutation of a broadcast dimension")
        if n == 1:  # x[..., [0]] on a size-1 dimension: the identity, no digit to permute
            return act
        act = act.closed()
        new = Atom(n)
        rec = PermRec(tuple(leaves(size)), table, (new,), node, guards)
        dims = list(act.dims)
        dims[dim] = (new,)
        live = tuple(a for a in leaves(act.live) if a not in leafset(size)) + (new,)
        return replace(act, dims=tuple(dims), steps=act.steps + (rec,), live=live)

    def _branch_sum(self, node: fx.Node) -> ActT:
        """``f(x) + g(x)``: two branches of one tensor ``x``, each a linear image of it, summed.

        The sum continues the chain of ``x`` when the branches are all its users (else it
        starts a new chain at ``x``); the branches' root digits are unified with ``x``'s, so
        the planner reads both on the same feature space and merges them into one factor
        when the union of their supports is KS (``structure._branch_sum``).
        """
        if node.kwargs.get("alpha", 1) != 1:
            raise Unsupported("add with alpha")
        args = node.args[:2]
        branches = [self.states[arg].closed() for arg in args]
        origin = branches[0].root
        if branches[1].root is not origin:
            raise Unsupported("a sum of two activations that are not branches of one tensor")
        for arg, branch in zip(args, branches, strict=True):
            if not branch.has_work or branch.bias is not None or branch.cast is not None:
                raise Unsupported(f"the branch {arg.name} is not a product of {origin.name} by a weight")
            if len(arg.users) != 1 or _shape(arg) != _shape(node):
                raise Unsupported(f"the branch {arg.name} is used elsewhere or broadcast by the sum")
        inside = {n for branch in branches for n in branch.nodes}
        base = self.states.get(origin)
        if isinstance(base, ActT) and set(origin.users) <= inside:
            base = self._segment(base).closed()
        else:
            base = _root(origin)
        for branch in branches:
            for mine, theirs in zip(branch.root_dims, base.dims, strict=True):
                align(mine, theirs)
        dims = tuple(_sum_dims(leaves(a), leaves(b)) for a, b in zip(branches[0].dims, branches[1].dims, strict=True))
        out = leafset([a for d in dims for a in d])
        live = leafset(branches[0].live) | leafset(branches[1].live)
        passed = leafset([a for branch in branches for d in branch.dims for a in d])
        step = BranchSum(
            tuple(branches),
            dims,
            tuple(a for a in leaves([a for d in base.dims for a in d]) if a not in out),
            node,
            frozenset(b.chain_id for b in branches),
        )
        nodes = sorted(set(base.nodes) | inside, key=self._order.__getitem__)
        live = [a for a in leaves([a for d in dims for a in d]) if a in live or a not in passed]  # fresh: live
        return replace(base, dims=dims, steps=base.steps + (step,), live=tuple(live), nodes=tuple(nodes))

    def _reindex_view(self, node: fx.Node, act: ActT) -> ActT:
        """A reshape whose digits do not refine the current ones: new digits, identity table.

        Cut the flat digit list and the target shape at every common boundary; segments
        that regroup stay digits, the others are replaced by fresh digits (one per target
        dimension) linked to the old ones by the identity on their flat index.
        """
        flat = leaves([a for d in act.dims for a in d])
        shape = _shape(node)
        cuts_digits, cuts_shape = _prefix_products([a.size for a in flat]), _prefix_products(shape)
        common = [v for v in cuts_digits if v in cuts_shape]
        dims: list[tuple[Atom, ...]] = []
        steps = []
        live = list(leaves(act.live))
        bounds = [cuts_shape.index(v) for v in common[:-1]] + [len(shape)]
        for k, (lo, hi) in enumerate(zip(common, common[1:], strict=False)):
            digits = flat[cuts_digits.index(lo) : cuts_digits.index(hi)]
            targets = shape[bounds[k] : bounds[k + 1]]
            try:
                dims.extend(regroup(digits, targets))
                continue
            except AtomError:
                pass
            groups, rec, live = _identity_table(digits, targets, node, live, f"view to {list(shape)}")
            dims.extend(groups)
            steps.append(rec)
        if len(dims) != len(shape):
            raise AtomError(f"view to {list(shape)} cannot be described on digits")
        act = act.closed()
        return replace(act, dims=tuple(dims), steps=act.steps + tuple(steps), live=tuple(live))

    def _matmul(self, node: fx.Node, left, right, x: fx.Node, restart: bool) -> ActT:
        batched = node.target in (aten.bmm.default, aten.bmm.out)
        act_left = left is x
        act = self._act_input(x, restart).closed()
        w = self._weight_arg(right if act_left else left)
        if act_left:  # (b, m, k) @ (b, k, n)
            a_dims, w_dims = act.dims, w.dims
            if batched:
                align(a_dims[0], w_dims[0])
            align(a_dims[-1], w_dims[-2])
            summed = a_dims[-1]
            out = (a_dims[0],) * batched + (a_dims[-2], w_dims[-1])
        else:  # (b, m, k) @ (b, k, n) with the weight on the left
            a_dims, w_dims = act.dims, w.dims
            if batched:
                align(w_dims[0], a_dims[0])
            align(w_dims[-1], a_dims[-2])
            summed = a_dims[-2]
            out = (a_dims[0],) * batched + (w_dims[-2], a_dims[-1])
        factor = Factor(w, tuple(act.live), node, summed=tuple(summed), out_dims=out)
        live = _live_after(act.live, w, summed)
        return replace(act, dims=out, steps=act.steps + _split_outer(factor), live=live)

    def _convolution(self, node: fx.Node, x: fx.Node, restart: bool) -> ActT:
        """A 1x1 convolution, stride 1, no padding: the KS factor ``(g, C_out/g, C_in/g, 1)``.

        At every spatial position it multiplies the channels (dimension 1) by the
        block-diagonal matrix of its ``g`` groups; the spatial positions are batch digits.
        The channel digits split into ``(g, C_in/g)``, the weight's ``(C_out, C_in/g, 1..)``
        into ``(g, C_out/g)``: the groups are unified, ``C_in/g`` is contracted.
        """
        inp, weight, bias, stride, padding, _dilation, transposed, _output_padding, groups = node.args
        if inp is not x:
            raise Unsupported("convolution whose weight is an activation")
        kernel = [int(k) for k in weight.meta["val"].shape[2:]]
        if len(_shape(inp)) != 2 + len(kernel):
            raise Unsupported("convolution of an unbatched input")
        if transposed:
            raise Unsupported("transposed convolution (only plain 1x1 convolutions are channel products)")
        if any(k != 1 for k in kernel):
            size = "x".join(str(k) for k in kernel)
            raise Unsupported(f"convolution with a {size} kernel mixes spatial positions (only 1x1 kernels are KS)")
        if any(s != 1 for s in stride):
            raise Unsupported(f"convolution with stride {list(stride)} drops spatial positions")
        if any(p != 0 for p in padding):
            raise Unsupported(f"convolution with padding {list(padding)} adds positions that only see the bias")
        act = self._act_input(x, restart).closed()
        w = self._weight_arg(weight)
        c_in, c_out = _shape(inp)[1], _shape(node)[1]
        split = [sympy.Integer(groups), c_in / groups]
        try:
            group_in, per_in = regroup(leaves(act.dims[1]), split)
        except AtomError:  # the groups cut a digit (a (4, 3) shuffle read as 3 groups of 4)
            channels = leaves(act.dims[1])
            (group_in, per_in), rec, live = _identity_table(channels, split, node, leaves(act.live), "groups")
            dims = act.dims[:1] + (group_in + per_in,) + act.dims[2:]
            act = replace(act, dims=dims, steps=act.steps + (rec,), live=tuple(live))
        group_w, per_out = regroup(leaves(w.dims[0]), [sympy.Integer(groups), c_out / groups])
        align(group_in, group_w)
        align(per_in, w.dims[1])
        out = act.dims[:1] + (group_in + per_out,) + act.dims[2:]
        factor = Factor(w, tuple(act.live), node, summed=per_in, out_dims=out)
        act = replace(act, dims=out, steps=act.steps + _split_outer(factor), live=_live_after(act.live, w, per_in))
        if bias is None:
            return act
        b = self._weight_arg(bias)
        align(b.dims[0] if b.dims else (), out[1])
        return replace(act, bias=b, bias_node=node)

    def _broadcast(self, node: fx.Node, act_dims, w: WeightT):
        shape = _shape(node)
        n = len(shape)
        a_dims = ((),) * (n - len(act_dims)) + tuple(act_dims)
        w_dims = ((),) * (n - len(w.dims)) + tuple(w.dims)
        out = []
        for ad, wd in zip(a_dims, w_dims, strict=True):
            if ad and wd:
                align(ad, wd)
                out.append(ad)
            else:
                out.append(ad or wd)
        return tuple(out)

    def _mul(self, node: fx.Node, act: ActT, other) -> ActT:
        act = act.closed()
        w = self._weight_arg(other)
        dims = self._broadcast(node, act.dims, w)
        factor = Factor(w, tuple(act.live), node)
        live = _live_after(act.live, w, ())
        return replace(act, dims=dims, pending=factor, live=live)

    def _sum(self, node: fx.Node, act: ActT) -> ActT:
        if act.pending is None:
            raise Unsupported("sum without a pending product")
        args = node.args
        if len(args) < 2 or args[1] is None or (len(args) > 3 and args[3] is not None) or node.kwargs.get("dtype"):
            raise Unsupported("full reduction or dtype change")
        ndim = len(act.dims)
        reduced = {_norm(d, ndim) for d in args[1]}
        keepdim = bool(args[2]) if len(args) > 2 else bool(node.kwargs.get("keepdim", False))
        summed = tuple(a for k in sorted(reduced) for a in act.dims[k])
        dims = tuple(() if k in reduced else d for k, d in enumerate(act.dims) if keepdim or k not in reduced)
        factor = replace(act.pending, summed=act.pending.summed + summed, out_dims=dims)
        summed_set = leafset(summed)
        live = tuple(a for a in leaves(act.live) if a not in summed_set)
        return replace(act, dims=dims, steps=act.steps + _split_outer(factor), pending=None, live=live)

    def _add_bias(self, node: fx.Node, act: ActT, other) -> ActT:
        if not act.steps:
            raise Unsupported("bias without a preceding product")
        w = self._weight_arg(other)
        dims = self._broadcast(node, act.dims, w)
        if len(dims) != len(act.dims):
            raise Unsupported("bias broadcasts the activation")
        return replace(act, dims=dims, bias=w, bias_node=node)


def _sum_dims(first: list[Atom], second: list[Atom]) -> tuple[Atom, ...]:
    """One dimension of a sum of two branches: the digits both keep in place at its ends,
    one fresh digit for the part where they differ (same flat index in both)."""
    lo = 0
    while lo < min(len(first), len(second)) and first[lo] is second[lo]:
        lo += 1
    hi = 0
    while hi < min(len(first), len(second)) - lo and first[-1 - hi] is second[-1 - hi]:
        hi += 1
    middle = first[lo : len(first) - hi]
    if not middle and len(second) == len(first):
        return tuple(first)
    if not all(a.static for a in middle + second[lo : len(second) - hi]):
        raise AtomError("a sum of branches that differ on a symbolic digit")
    return tuple(first[:lo]) + (Atom(prod_size(middle)),) + tuple(first[len(first) - hi :])


def _identity_table(digits: list[Atom], targets: list, node: fx.Node, live: list[Atom], what: str):
    """Fresh digits of sizes ``targets`` reading the flat index of ``digits`` (identity table).

    ``(groups, step, live)``: one digit tuple per target (empty for size 1), the
    :class:`PermRec` linking them, and the live digits after it.
    """
    if not all(a.static for a in digits) or not set(digits) <= set(live):
        raise AtomError(f"{what} reshapes a batch or broadcast digit")
    fresh = [Atom(s) for s in targets if s != 1]
    it = iter(fresh)
    groups = [() if s == 1 else (next(it),) for s in targets]
    n = 1
    for a in digits:
        n *= a.int_size()
    rec = PermRec(tuple(digits), torch.arange(n), tuple(fresh), node)
    return groups, rec, [a for a in live if a not in set(digits)] + fresh


def _outer_parts(product: WeightT, operands: list[WeightT]) -> tuple[WeightT, ...]:
    """The two factors of ``product = A * B`` when A and B broadcast along disjoint dimensions.

    ``torch.kron(A, B)`` is traced this way: a product by it is a product by ``A`` (along
    its digits) then by ``B``, two KS factors with tied values instead of a dense matrix.
    Each part reads its own source on the product's atoms. ``()`` otherwise.
    """
    n = len(product.dims)
    parts = []
    owners = [0] * n
    for w in operands:
        lead = n - len(w.dims)
        mine = [k for k in range(lead, n) if prod_size(w.dims[k - lead]) != 1]
        if not mine or any(not product.dims[k] for k in mine):
            return ()
        for k in mine:
            owners[k] += 1
        ids = w.dense_ids()
        core_atoms = tuple(a for k in mine for a in product.dims[k])
        parts.append(WeightT((), w.source, ids.reshape([a.int_size() for a in core_atoms]), core_atoms, w.guards))
    if max(owners) > 1 or not all(bool((part.core != 0).all()) for part in parts):
        return ()
    return tuple(parts)


def _split_outer(factor: Factor) -> tuple[Factor, ...]:
    """A product by ``A ⊗ B`` as a product by ``A`` (summing A's digits) then by ``B``."""
    if not factor.weight.parts:
        return (factor,)
    first, second = factor.weight.parts
    of_second = leafset(second.core_atoms)
    summed = leaves(factor.summed)
    summed_first = tuple(a for a in summed if a not in of_second)
    summed_second = tuple(a for a in summed if a in of_second)
    one = Factor(first, tuple(leaves(factor.live_before)), factor.node, summed_first, None, whole=factor)
    live = _live_after(factor.live_before, first, summed_first)
    two = Factor(second, live, factor.node, summed_second, factor.out_dims, rest_of_split=True)
    return one, two


def _live_after(live, w: WeightT, summed) -> tuple[Atom, ...]:
    live_leaves = leaves(live)
    seen = set(live_leaves)
    out = list(live_leaves)
    for atom in leaves(w.core_atoms):
        if atom not in seen:
            out.append(atom)
            seen.add(atom)
    summed_set = leafset(summed)
    return tuple(a for a in out if a not in summed_set)


_SCRATCH_VIEWS = {aten.transpose.int, aten.permute.default, aten.view.default, aten.t.default, aten.unsqueeze.default}


def _check_scratch_out(out, x: fx.Node) -> None:
    """``bmm(..., out=buffer)`` computes a plain product when ``buffer`` is fresh scratch.

    That is the case when ``out`` is a view of an ``empty`` tensor that nothing else reads
    (the layout of the user's preallocated output does not change the values).
    """
    node = out
    while isinstance(node, fx.Node) and node.target in _SCRATCH_VIEWS and len(node.users) == 1:
        node = node.args[0]
    fresh = (aten.empty.memory_format, aten.empty_strided.default)
    if not (isinstance(node, fx.Node) and node.target in fresh and len(node.users) == 1) or out is x:
        raise Unsupported("out= product into a tensor that is read elsewhere")


def _prefix_products(sizes) -> list:
    out = [sympy.Integer(1)]
    for size in sizes:
        out.append(sympy.expand(out[-1] * size))
    return out


def _flat_nodes(args) -> list[fx.Node]:
    out = []
    fx.node.map_arg(args, out.append)
    return out
