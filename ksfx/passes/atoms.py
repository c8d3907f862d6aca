"""Index atoms: the mixed-radix digits every tracked tensor index is made of.

A tensor dimension is described as a tuple of *atoms*, most significant first: the
dimension's index is the mixed-radix number formed by the atoms' digits. Views regroup
atoms (``reshape`` merges and splits, ``permute`` reorders, ``expand`` adds atoms the
value does not depend on), so after any sequence of views every element of a tracked
tensor is still addressed by the same atoms as the tensor it came from.

Atoms are refined lazily: when a view needs a digit boundary inside an atom, the atom
is split into children (most significant first) everywhere at once. Two atoms that
must be the same digit (the shared index of a contraction) are unified (union-find).
Sizes are sympy expressions, so symbolic batch sizes are atoms like any other; only
static atoms are ever split or evaluated.
"""

from __future__ import annotations

import itertools
import math
from collections import deque

import sympy
import torch

_ids = itertools.count()


class AtomError(ValueError):
    """A view that does not regroup whole digits (the pass then leaves the node alone)."""


def size_expr(size) -> sympy.Expr:
    """A dimension size (int or SymInt) as a sympy expression."""
    if isinstance(size, torch.SymInt):
        return sympy.sympify(size.node.expr)
    return sympy.Integer(int(size))


def _divides(small: sympy.Expr, big: sympy.Expr) -> sympy.Expr | None:
    """``big / small`` when it is an integer expression, else None."""
    quotient = sympy.cancel(big / small)
    if quotient.is_Integer and quotient > 0:
        return quotient
    if quotient.free_symbols and sympy.fraction(quotient)[1] == 1:
        return quotient
    return None


class Atom:
    """One digit of an index space. Use :func:`leaves` to read its current refinement."""

    __slots__ = ("size", "parent", "children", "uid", "source")

    def __init__(self, size: sympy.Expr, source: tuple | None = None) -> None:
        self.size = sympy.sympify(size)
        self.parent: Atom | None = None
        self.children: tuple[Atom, ...] = ()
        self.uid = next(_ids)
        # (fx node, dim) where a symbolic size can be read at run time.
        self.source = source

    def find(self) -> Atom:
        atom = self
        while atom.parent is not None:
            atom = atom.parent
        return atom

    @property
    def static(self) -> bool:
        return self.size.is_Integer

    def int_size(self) -> int:
        if not self.static:
            raise AtomError(f"atom of symbolic size {self.size} has no static size")
        return int(self.size)

    def __repr__(self) -> str:
        return f"a{self.find().uid}[{self.size}]"


def leaves(atoms) -> list[Atom]:
    """Current finest refinement of ``atoms`` (an atom or an iterable), as representatives."""
    if isinstance(atoms, Atom):
        atoms = (atoms,)
    out: list[Atom] = []
    for atom in atoms:
        root = atom.find()
        if root.children:
            out.extend(leaves(root.children))
        else:
            out.append(root)
    return out


def leafset(atoms) -> set[Atom]:
    return set(leaves(atoms))


def split(atom: Atom, sizes: list[sympy.Expr]) -> tuple[Atom, ...]:
    root = atom.find()
    if root.children:
        raise AtomError("internal: splitting an atom that is already refined")
    if sympy.simplify(math.prod(sizes) - root.size) != 0:
        raise AtomError(f"cannot split an atom of size {root.size} into {sizes}")
    if not all(sympy.sympify(s).is_Integer for s in sizes) and not root.static and len(sizes) > 1:
        raise AtomError(f"cannot split the symbolic size {root.size} into {sizes}")
    root.children = tuple(Atom(s) for s in sizes)
    return root.children


def unify(first: Atom, second: Atom) -> None:
    a, b = first.find(), second.find()
    if a is b:
        return
    if a.children or b.children:
        raise AtomError("internal: unify expects leaves")
    if sympy.simplify(a.size - b.size) != 0:
        raise AtomError(f"cannot identify digits of sizes {a.size} and {b.size}")
    if b.source is not None and a.source is None:
        a.source = b.source
    b.parent = a


def prod_size(atoms) -> sympy.Expr:
    return sympy.Mul(*[a.size for a in leaves(atoms)]) if atoms else sympy.Integer(1)


def regroup(atoms: list[Atom], shape: list[sympy.Expr]) -> tuple[tuple[Atom, ...], ...]:
    """Split the flat digit list ``atoms`` into dimensions of sizes ``shape`` (a view)."""
    queue = deque(leaves(atoms))
    dims = []
    for target in shape:
        remaining = sympy.sympify(target)
        dim: list[Atom] = []
        while remaining != 1:
            if not queue:
                raise AtomError(f"view to {list(shape)} needs more digits than the tensor has")
            atom = queue.popleft()
            quotient = _divides(atom.size, remaining)
            if quotient is not None:
                dim.append(atom)
                remaining = quotient
                continue
            rest = _divides(remaining, atom.size)
            if rest is None:
                raise AtomError(f"view to {list(shape)} cuts a digit of size {atom.size} at {remaining}")
            head, tail = split(atom, [remaining, rest])
            dim.append(head)
            queue.appendleft(tail)
            remaining = sympy.Integer(1)
        dims.append(tuple(dim))
    if queue:
        raise AtomError(f"view to {list(shape)} leaves digits unused")
    return tuple(dims)


def align(first: list[Atom], second: list[Atom]) -> None:
    """Unify two digit lists describing the same index (common refinement, then pairwise)."""
    left, right = deque(leaves(first)), deque(leaves(second))
    while left and right:
        a, b = left.popleft(), right.popleft()
        if a is b:
            continue
        if sympy.simplify(a.size - b.size) == 0:
            unify(a, b)
            continue
        quotient = _divides(b.size, a.size)
        if quotient is not None:
            head, tail = split(a, [b.size, quotient])
            unify(head, b)
            left.appendleft(tail)
            continue
        quotient = _divides(a.size, b.size)
        if quotient is None:
            raise AtomError(f"digits of sizes {a.size} and {b.size} do not align")
        head, tail = split(b, [a.size, quotient])
        unify(a, head)
        right.appendleft(tail)
    if left or right:
        raise AtomError("digit lists of different total size cannot be aligned")


def index_grid(order: list[Atom], targets: list[list[Atom]]) -> list[torch.Tensor]:
    """For each target digit list, its flat index at every point of the grid over ``order``.

    The grid has one axis per atom of ``order`` (static sizes). A target digit that is
    not in ``order`` contributes 0 (the tensor is read at digit 0 along it); callers use
    that only for atoms the indexed tensor does not depend on.
    """
    order = leaves(order)
    sizes = [a.int_size() for a in order]
    axis_of = {atom: k for k, atom in enumerate(order)}
    out = []
    for target in targets:
        index = torch.zeros([1] * len(order), dtype=torch.long)
        for atom in leaves(target):
            index = index * atom.int_size()
            k = axis_of.get(atom)
            if k is not None:
                shape = [1] * len(order)
                shape[k] = sizes[k]
                index = index + torch.arange(sizes[k]).reshape(shape)
        out.append(index.expand(sizes) if sizes else index.reshape(()))
    return out
