"""Weight-side tracking: which element of which tensor every weight entry reads.

A weight-derived tensor (computed from parameters, buffers and constants only) is
described by a *source* node and an integer id tensor: id ``k > 0`` means "element
``k - 1`` of the flattened source", id 0 a structural zero. Views keep the source and
move ids through the atom algebra without materialising anything (so a weight expanded
over a symbolic batch costs nothing); pure data movement (``block_diag``, ``cat``,
indexing by a constant, slicing) runs the same aten op on the id tensor; any other op
starts a new source at its own output, with the support it provably has (a product with
a constant 0/1 mask keeps only the mask's support; unknown ops are assumed dense).

Values are always read at run time from the source node, never folded: the ids only
decide *where* the nonzeros can be. Supports that depend on tensor values (masks,
constant index tensors, frozen weights) record the placeholders they read as guards.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass, field

import torch
import torch.fx as fx

from ksfx.passes.atoms import Atom, AtomError, index_grid, leaves, prod_size

aten = torch.ops.aten

#: Dense id tensors larger than this are not materialised (the node is left alone).
MAX_DENSE = 1 << 24

# Ops that only move elements: running them on the id tensor gives the ids of the output.
DATA_MOVEMENT = {
    aten.clone.default,
    aten.alias.default,
    aten.lift_fresh_copy.default,
    aten.slice.Tensor,
    aten.select.int,
    aten.index.Tensor,
    aten.index_select.default,
    aten.cat.default,
    aten.stack.default,
    aten.block_diag.default,
    aten.flip.default,
    aten.repeat.default,
    aten.unbind.int,
    aten.split.Tensor,
    aten.split_with_sizes.default,
    aten.constant_pad_nd.default,
    aten.diag_embed.default,
}
# Elementwise ops that map zero to zero (support of the output = support of the input).
ZERO_PRESERVING_UNARY = {aten._to_copy.default, aten.neg.default, aten.detach.default}


@dataclass
class WeightT:
    """A weight-derived tensor: ``value[i] = source.flatten()[core[...] - 1]`` (0: zero)."""

    dims: tuple[tuple[Atom, ...], ...]
    source: fx.Node
    core: torch.Tensor  # int64 ids, one axis per atom of core_atoms
    core_atoms: tuple[Atom, ...]
    guards: frozenset = field(default_factory=frozenset)  # placeholder nodes whose values shaped the support
    # An outer (Kronecker) product of two weights on disjoint digits: the parts, whose
    # core atoms are this tensor's. A product by it is two products, one per part.
    parts: tuple[WeightT, ...] = ()

    def fresh(self) -> WeightT:
        """A copy with new atoms, so that unifying it with an activation touches nothing else."""
        mapping: dict[Atom, Atom] = {}

        def remap(atom_list):
            out = []
            for leaf in leaves(atom_list):
                if leaf not in mapping:
                    mapping[leaf] = Atom(leaf.size, leaf.source)
                out.append(mapping[leaf])
            return out

        def fresh_core(weight: WeightT) -> tuple[torch.Tensor, tuple[Atom, ...]]:
            core_leaves = leaves(weight.core_atoms)
            core = weight.core.reshape([leaf.int_size() for leaf in core_leaves])
            return core, tuple(remap(core_leaves))

        dims = tuple(tuple(remap(d)) for d in self.dims)
        core, core_atoms = fresh_core(self)
        parts = tuple(WeightT((), part.source, *fresh_core(part), part.guards) for part in self.parts)
        return WeightT(dims, self.source, core, core_atoms, self.guards, parts)

    def dense_ids(self) -> torch.Tensor:
        """The id of every element, in the tensor's own shape (static shapes only)."""
        shape = [prod_size(d) for d in self.dims]
        if not all(s.is_Integer for s in shape):
            raise AtomError("a weight with a symbolic shape cannot be materialised")
        shape = [int(s) for s in shape]
        if math.prod(shape) > MAX_DENSE:
            raise AtomError(f"weight of shape {shape} is too large to analyse")
        order = [leaf for d in self.dims for leaf in leaves(d)]
        return read_core(self, order).reshape(shape)


def read_core(weight: WeightT, order: list[Atom]) -> torch.Tensor:
    """Ids of ``weight`` on the grid of the digits ``order`` (one axis per digit)."""
    order = leaves(order)
    missing = set(leaves(weight.core_atoms)) - set(order)
    if missing:
        raise AtomError(f"weight depends on digits {sorted(missing, key=id)} outside the requested grid")
    if len(set(order)) != len(order):
        raise AtomError("internal: repeated digit in a grid")
    sizes = [atom.int_size() for atom in order]
    core = weight.core.reshape([int(prod_size([atom])) for atom in weight.core_atoms])
    if not weight.core_atoms:
        return core.reshape([1] * len(order)).expand(sizes)
    indices = index_grid(order, [[atom] for atom in weight.core_atoms])
    return core[tuple(indices)]


def fresh_dims(node_val: torch.Tensor, node: fx.Node) -> tuple[tuple[Atom, ...], ...]:
    """One new atom per non-unit dimension of ``node_val`` (symbolic sizes remember their node)."""
    from ksfx.passes.atoms import size_expr

    dims = []
    for k, size in enumerate(node_val.shape):
        expr = size_expr(size)
        dims.append(() if expr == 1 else (Atom(expr, source=(node, k)),))
    return tuple(dims)


def new_source(node: fx.Node, val: torch.Tensor, support: torch.Tensor | None, guards=frozenset()) -> WeightT:
    """A weight whose values are read from ``node`` itself, nonzero where ``support`` says."""
    dims = fresh_dims(val, node)
    shape = [int(s) for s in val.shape]
    if math.prod(shape) > MAX_DENSE:
        raise AtomError(f"weight of shape {shape} is too large to analyse")
    ids = torch.arange(1, math.prod(shape) + 1, dtype=torch.long).reshape(shape)
    if support is not None:
        ids = ids * support.reshape(shape).to(torch.long)
    core_atoms = tuple(a for d in dims for a in d)
    return WeightT(dims, node, ids.reshape([int(a.size) for a in core_atoms]), core_atoms, frozenset(guards))


def from_ids(node: fx.Node, val: torch.Tensor, ids: torch.Tensor, source: fx.Node, guards) -> WeightT:
    dims = fresh_dims(val, node)
    core_atoms = tuple(a for d in dims for a in d)
    return WeightT(dims, source, ids.reshape([int(a.size) for a in core_atoms]), core_atoms, frozenset(guards))


class ValueEvaluator:
    """Concrete values of nodes that depend only on constants and value-known placeholders.

    ``known`` maps placeholder nodes to the real tensors whose values may shape a support
    (buffers, frozen parameters); ``get_attr`` constants are always known. Random ops are
    never evaluated.
    """

    def __init__(self, gm: fx.GraphModule, known: dict[fx.Node, torch.Tensor]) -> None:
        self.gm = gm
        self.known = known
        self.cache: dict[fx.Node, object] = {}

    def guards_of(self, node: fx.Node) -> frozenset:
        found, stack, seen = set(), [node], set()
        while stack:
            n = stack.pop()
            if n in seen:
                continue
            seen.add(n)
            if n.op == "placeholder":
                found.add(n)
            stack.extend(n.all_input_nodes)
        return frozenset(found)

    def value(self, node) -> object:
        if not isinstance(node, fx.Node):
            return node
        if node in self.cache:
            return self.cache[node]
        result = self._compute(node)
        self.cache[node] = result
        return result

    def _compute(self, node: fx.Node):
        if node.op == "placeholder":
            if node not in self.known:
                raise AtomError(f"{node.name} is not a constant")
            return self.known[node].detach()
        if node.op == "get_attr":
            return getattr(self.gm, node.target).detach()
        if node.op != "call_function":
            raise AtomError(f"cannot evaluate {node.op} {node.name}")
        target = node.target
        if isinstance(target, torch._ops.OpOverload) and torch.Tag.nondeterministic_seeded in target.tags:
            raise AtomError(f"{node.name} is random")
        if not (isinstance(target, torch._ops.OpOverload) or target is operator.getitem):
            raise AtomError(f"cannot evaluate {target}")
        args = torch.fx.node.map_arg(node.args, self.value)
        kwargs = torch.fx.node.map_arg(node.kwargs, self.value)
        with torch.no_grad():
            return target(*args, **kwargs)
