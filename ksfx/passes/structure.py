"""From a tracked activation to a KS chain: feature spaces, factors, permutations, values.

Given the steps between a root and a chain end (see :mod:`ksfx.passes.detect`):

* the root's dimensions from the first one a weight touches to the last are features
  (batch-first; batch-last: from dimension 0 to the last one touched; or in the middle,
  channels-first ``(N, C, H, W)``), the others are batch digits. Batch digits must
  arrive at the end in the same order and on the same side(s), so the op can see the
  tensors as 2-D. Untouched feature digits are tied.
* each product with a weight, seen on the feature space ``S`` it reads, keeps some
  digits (``P``), contracts some (``K``) and creates some (``N``): that is the factor
  ``(a, b, c, d) = (|P_hi|, |N|, |K|, |P_lo|)`` after the digit permutation that brings
  ``S`` to ``(P_hi, K, P_lo)``. Its values are the weight's ids on the grid
  ``(P_hi, N, K, P_lo)``; a weight that does not depend on a kept digit is tied along it.
* when the weight has structural zeros inside that factor (a ``block_diag`` weight, a
  masked dense weight) the factor's support is analysed again: it must be a disjoint
  union of equal complete ``b×c`` blocks, which is a KS factor up to row and column
  permutations (:func:`factor_from_support`).
* constant index tables become :class:`~ksfx.pattern.IndexPerm` steps; every
  permutation is finally simplified to digit arithmetic where possible.
* a sum of branches of one tensor (:class:`~ksfx.passes.detect.BranchSum`), each a
  single factor between permutations, is one factor when the union of their supports
  is KS (a butterfly factor ``w1 * x + w2 * x[..., i ^ s]``); its values are the sum of
  the branches' values gathered at that factor's entries.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
import torch.fx as fx

from ksfx.passes.atoms import Atom, leafset, leaves
from ksfx.passes.detect import ActT, BranchSum, Factor, PermRec, Unsupported
from ksfx.passes.weights import MAX_DENSE, read_core
from ksfx.pattern import Chain, DigitPerm, IndexPerm, KSPattern, Perm, simplify


@dataclass(frozen=True, eq=False)
class ValueSource:
    """A tensor built at run time as ``source.flatten()[ids - 1]`` (id 0: a zero), plus the
    tensors of ``plus`` (same shape): a factor summed from branches with other sources."""

    source: fx.Node
    ids: torch.Tensor
    dense: bool = False  # the original op multiplies by the structural zeros too (masked weight)
    plus: tuple[ValueSource, ...] = ()

    def terms(self) -> tuple[ValueSource, ...]:
        return (replace(self, plus=()), *self.plus)

    def remapped(self, remap) -> ValueSource:
        """The same terms with every id tensor passed through ``remap`` (entries moved)."""
        return replace(self, ids=remap(self.ids), plus=tuple(term.remapped(remap) for term in self.plus))


@dataclass(frozen=True, eq=False)
class ChainPlan:
    """Everything the rewrite needs for one chain (``chain`` is leftmost first)."""

    root: fx.Node
    end: fx.Node
    chain: Chain
    values: tuple[ValueSource, ...]  # in the order of chain.patterns
    bias: ValueSource | None
    batch_last: bool
    end_dims: tuple[tuple[Atom, ...], ...]
    nodes: tuple[fx.Node, ...]
    guards: frozenset
    source_flops: int  # per batch row, as the original ops compute it
    tied: int = 1  # product of the feature digits no weight depends on (1: none)
    unseen: int = 1  # product of the tied digits no weight even broadcasts along
    cast: torch.dtype | None = None  # the root is cast to this dtype first (autocast)
    root_feature_dims: tuple[int, ...] = ()  # dimensions of the root holding feature digits
    root_order: tuple[int, ...] | None = None  # the root is read permuted to this dim order first
    # Trailing root dimensions that are batch dimensions *after* the features (a
    # channels-first (N, C, H, W) input mixing C: 2). The op then runs batch-last on the
    # input with the features moved to the front. 0: batch-first or batch-last.
    inner_dims: int = 0


def _sizes(atoms) -> list[int]:
    return [a.int_size() for a in atoms]


def _prod(atoms) -> int:
    return math.prod(_sizes(atoms))


def digit_perm(current: list[Atom], target: list[Atom]) -> DigitPerm | None:
    """The gather taking a vector indexed by ``current`` digits to ``target`` digits."""
    if current == target:
        return None
    order = tuple(current.index(a) for a in target)
    return DigitPerm(tuple(_sizes(current)), order)


def _touched(steps) -> set[Atom]:
    """Digits the steps read through a weight, sum over, permute or (a branch sum) consume."""
    touched: set[Atom] = set()
    for step in steps:
        if isinstance(step, Factor):
            touched |= leafset(step.weight.core_atoms) | leafset(step.summed)
        elif isinstance(step, BranchSum):
            touched |= leafset(step.consumed)
            for branch in step.branches:
                touched |= _touched(branch.steps)
        else:
            touched |= leafset(step.src)
    return touched


def _seen(steps) -> set[Atom]:
    """Digits of the weights' dimensions, broadcast ones included (a weight expanded along ``d``)."""
    seen: set[Atom] = set()
    for step in steps:
        if isinstance(step, Factor):
            seen |= leafset([a for d in step.weight.dims for a in d]) | leafset(step.weight.core_atoms)
        elif isinstance(step, BranchSum):
            for branch in step.branches:
                seen |= _seen(branch.steps)
    return seen


def _has_factor(steps) -> bool:
    return any(
        isinstance(step, Factor) or (isinstance(step, BranchSum) and any(_has_factor(b.steps) for b in step.branches))
        for step in steps
    )


def plan_chain(act: ActT, end: fx.Node, root_order: tuple[int, ...] | None = None) -> ChainPlan:
    """``root_order``: read the root's dimensions in this order (a permute before the 2-D view)."""
    act = act.closed()
    if root_order is not None:
        act = replace(act, root_dims=tuple(act.root_dims[k] for k in root_order))
    if not _has_factor(act.steps):
        raise Unsupported("no product with a weight (permutations only)")
    if any(a.size == 0 for a in leaves([a for d in act.root_dims for a in d])):
        raise Unsupported("the input is empty (a dimension of size 0): nothing to compute")
    touched = _touched(act.steps)
    batch, features, batch_last, inner_dims = _split_root(act.root_dims, touched)
    tied = [a for a in features if a not in touched]
    batch_set = set(batch)
    end_leaves = leaves([a for d in act.dims for a in d])
    if set(end_leaves) != leafset(act.live):
        raise Unsupported("the output is broadcast along a digit it does not depend on")
    end_batch = [a for a in end_leaves if a in batch_set]
    if end_batch != leaves(batch):
        raise Unsupported("batch digits are reordered between input and output")
    if inner_dims:
        inner = len(leaves([a for d in act.root_dims[len(act.root_dims) - inner_dims :] for a in d]))
        outer = len(batch) - inner
        if not all(a in batch_set for a in end_leaves[:outer] + end_leaves[len(end_leaves) - inner :]):
            raise Unsupported("input and output layouts differ (the input has batch digits on both sides)")
    elif _layout(end_leaves, batch_set, "output") not in (None, batch_last):
        raise Unsupported("input and output layouts differ (batch-first vs batch-last)")
    out_features = [a for a in end_leaves if a not in batch_set]
    for atom in features + out_features:
        if not atom.static:
            raise Unsupported(f"feature digit of symbolic size {atom.size}")

    applied: list = []  # application order: perms and (pattern, ValueSource)
    guards: set = set()
    space, source_flops = _apply(act.steps, list(features), batch_set, applied, guards)
    if set(space) != set(out_features):
        raise Unsupported("internal: final feature space does not match the output")
    final = digit_perm(space, out_features)
    if final is not None:
        applied.append(final)

    bias = None
    if act.bias is not None:
        core = leafset(act.bias.core_atoms)
        if not core <= set(out_features):
            raise Unsupported("bias depends on batch digits")
        bias = ValueSource(act.bias.source, read_core(act.bias, out_features).reshape(-1))
        guards |= act.bias.guards

    steps, values = [], []
    for item in reversed(applied):
        if isinstance(item, tuple):
            steps.append(item[0])
            values.append(item[1])
        else:
            steps.append(item)
    steps, values = absorb_permutations(list(Chain(tuple(steps)).simplified().steps), values)
    chain = Chain(tuple(steps)).simplified()
    return ChainPlan(
        root=act.root,
        end=end,
        chain=chain,
        values=tuple(values),
        bias=bias,
        batch_last=batch_last,
        end_dims=act.dims,
        nodes=act.nodes,
        guards=frozenset(guards),
        source_flops=source_flops,
        tied=_prod(tied),
        unseen=_prod([a for a in tied if a not in _seen(act.steps)]),
        cast=act.cast,
        root_feature_dims=tuple(
            k if root_order is None else root_order[k]  # dimensions of the root as it is, unpermuted
            for k, d in enumerate(act.root_dims)
            if leafset(d) & set(features)
        ),
        root_order=root_order,
        inner_dims=inner_dims,
    )


def _apply(steps, space: list[Atom], batch: set[Atom], applied: list, guards: set) -> tuple[list[Atom], int]:
    """Plan ``steps`` from the feature space ``space``: ``(final space, original FLOPs)``."""
    source_flops = 0
    for step in steps:
        space = leaves(space)  # digits may have been refined after they were recorded
        if isinstance(step, Factor):
            space, flops = _factor(step, space, batch, applied)
            source_flops += flops
            guards |= step.weight.guards
        elif isinstance(step, BranchSum):
            space, flops = _branch_sum(step, space, batch, applied, guards)
            source_flops += flops
        else:
            space = _perm(step, space, applied)
            guards |= step.guards
    return leaves(space), source_flops


def _branch_sum(step: BranchSum, space: list[Atom], batch: set[Atom], applied: list, guards: set):
    """``Σ_k P_k · K_k · Q_k`` as one factor: each branch must be a single factor between
    permutations, and the union of their supports KS (up to permutations).

    Every branch is planned from ``space``; its entries are the factor's, moved by the
    permutations around it (rows in the order of the sum's output digits). The merged
    factor's values are the branches' ids read at its entries, one term per branch (one
    term when all branches read one tensor at disjoint entries).
    """
    out = [a for a in leaves([a for d in step.dims for a in d]) if a not in batch]
    if leafset(step.consumed) & batch:
        raise Unsupported(f"the branches of the sum {step.node.name} move batch digits")
    shape = (_prod(out), _prod(space))
    if shape[0] * shape[1] > MAX_DENSE:
        raise Unsupported(f"the sum {step.node.name} is too large ({shape[0]}x{shape[1]}) to analyse")
    names = ", ".join(b.nodes[-1].name for b in step.branches)
    support = torch.zeros(shape, dtype=torch.bool)
    entries, flops, structured = [], 0, False
    for branch in step.branches:
        sub: list = []
        end, branch_flops = _apply(branch.steps, space, batch, sub, guards)
        flops += branch_flops
        branch_out = [a for a in leaves([a for d in branch.dims for a in d]) if a not in batch]
        if set(end) != set(branch_out):
            raise Unsupported(f"internal: a branch of {step.node.name} does not end on its output digits")
        final = digit_perm(end, branch_out)
        if final is not None:
            sub.append(final)
        factors = [k for k, item in enumerate(sub) if isinstance(item, tuple)]
        if len(factors) != 1 or sub[factors[0]][1].dense or sub[factors[0]][1].plus:
            raise Unsupported(
                f"the branch {branch.nodes[-1].name} of the sum {step.node.name} is not a single plain factor"
            )
        structured |= sub[factors[0]][0].a * sub[factors[0]][0].d > 1
        rows, cols, value = _branch_entries(sub, factors[0])
        support[rows, cols] = True
        entries.append((value.source, rows * shape[1] + cols, value.ids.reshape(-1)))
    found = factor_from_support(support)
    if found is None:
        raise Unsupported(f"the sum {step.node.name} of the branches {names} is not Kronecker-sparse")
    out_perm, pattern, in_perm, rows, cols = found
    if structured and pattern.a * pattern.d == 1:
        raise Unsupported(f"the sum {step.node.name} of the branches {names} is a dense matrix")
    at = rows * shape[1] + cols
    picked = [(source, _lookup(flat, ids, at)) for source, flat, ids in entries]
    if len({source for source, _ in picked}) == 1 and not bool(sum((ids != 0).long() for _, ids in picked).gt(1).any()):
        picked = [(picked[0][0], sum(ids for _, ids in picked))]  # one tensor, disjoint entries: one gather
    terms = [ValueSource(source, ids.contiguous()) for source, ids in picked]
    if in_perm is not None:
        applied.append(in_perm)
    applied.append((pattern, replace(terms[0], plus=tuple(terms[1:]))))
    if out_perm is not None:
        applied.append(out_perm)
    return out, flops


def _branch_entries(sub: list, k: int) -> tuple[torch.Tensor, torch.Tensor, ValueSource]:
    """Matrix coordinates of the factor ``sub[k]`` in the map of the steps ``sub``
    (application order): permutations applied before it move its columns, after it its rows."""
    pattern, value = sub[k]
    rows, cols = (grid.reshape(-1) for grid in pattern.index_grids())
    for perm in reversed(sub[:k]):  # y = P x reads x[source]: the factor's column c reads source[c]
        cols = perm.indices()[cols]
    for perm in sub[k + 1 :]:  # the factor's row r lands where the gather reads it
        rows = torch.argsort(perm.indices())[rows]
    return rows, cols, value


def _lookup(keys: torch.Tensor, values: torch.Tensor, query: torch.Tensor) -> torch.Tensor:
    """``values`` at the positions of ``query`` in ``keys`` (distinct), 0 where absent."""
    order = torch.argsort(keys)
    keys, values = keys[order], values[order]
    pos = torch.searchsorted(keys, query).clamp(max=keys.numel() - 1)
    return torch.where(keys[pos] == query, values[pos], torch.zeros_like(query))


def reroot(act: ActT, node: fx.Node, state: ActT) -> ActT:
    """``act`` seen from ``node``, a view of the root earlier in the chain (``state`` is its state).

    The views up to ``node`` stay outside the region; its dimensions become the root's.
    A dense layer reading a transposed activation (an attention output) is a plain
    matrix product from the transposed view, whose token digits are batch digits, while
    from the untransposed root they sit between feature digits and would be tied.
    """
    if state.has_work or state.bias is not None or state.chain_id != act.chain_id or node not in act.nodes:
        raise Unsupported(f"{node.name} is not a view of the chain's root")
    position = act.nodes.index(node)
    cast = None if state.cast is not None else act.cast  # a view after the cast is already cast
    return replace(act, root=node, root_dims=state.dims, nodes=act.nodes[position + 1 :], cast=cast)


def absorb_permutations(steps: list, values: list[ValueSource]) -> tuple[list, list[ValueSource]]:
    """Fold permutations next to a factor into its ``(a, d)`` indices when the result is KS.

    ``P_out · K · P_in`` is again a KS factor when the permutations only move digits
    between the block indices (the d-interleaving of a block-diagonal factor, say). Each
    factor, in application order, tries both neighbours, then its input side, then its
    output side; what no factor can absorb stays in the chain. Values follow the moved
    entries.
    """
    k = len(steps) - 1
    factor_index = len(values) - 1
    while k >= 0:
        step = steps[k]
        if not isinstance(step, KSPattern):
            k -= 1
            continue
        left = k - 1 if k > 0 and not isinstance(steps[k - 1], KSPattern) else None
        right = k + 1 if k + 1 < len(steps) and not isinstance(steps[k + 1], KSPattern) else None
        for use_left, use_right in ((True, True), (False, True), (True, False)):
            lo = left if use_left else None
            hi = right if use_right else None
            if (use_left and lo is None) or (use_right and hi is None):
                continue
            merged = _merge(steps[lo] if lo is not None else None, step, steps[hi] if hi is not None else None)
            if merged is None:
                continue
            pattern, remap = merged
            start = lo if lo is not None else k
            stop = (hi if hi is not None else k) + 1
            steps[start:stop] = [pattern]
            values[factor_index] = values[factor_index].remapped(remap)
            k = start
            break
        k -= 1
        factor_index -= 1
    return steps, values


def _merge(out_perm, pattern: KSPattern, in_perm):
    """``(merged pattern, remap)`` when ``out_perm · pattern · in_perm`` is KS; ``remap``
    moves a value (id) tensor of ``pattern`` to the merged one's entries."""
    rows, cols = pattern.shape
    if rows * cols > MAX_DENSE:
        return None
    row_src = out_perm.indices() if out_perm is not None else torch.arange(rows)
    col_inv = torch.argsort(in_perm.indices()) if in_perm is not None else torch.arange(cols)
    support = pattern.support()[row_src][:, col_inv]
    merged = KSPattern.from_support(support)
    if merged is None or merged.nnz != pattern.nnz:
        return None
    r, c = merged.index_grids()

    def remap(ids: torch.Tensor) -> torch.Tensor:
        return pattern.to_dense(ids.reshape(pattern.as_tuple()))[row_src][:, col_inv][r, c]

    return merged, remap


def _split_root(root_dims, touched: set[Atom]) -> tuple[list[Atom], list[Atom], bool, int]:
    """``(batch digits, feature digits, batch_last, inner_dims)`` of the chain's input.

    Batch-first: the features are the trailing dimensions from the first one a weight
    touches; batch-last: the leading dimensions up to the last one touched. Otherwise the
    features are the dimensions from the first touched one to the last, with batch
    dimensions on both sides (channels-first activations, ``(N, C, H, W)`` mixing ``C``):
    ``inner_dims`` counts the trailing ones, and the op runs batch-last. Feature digits no
    weight touches are kept by every factor (tied values).
    """
    dims = [leaves(d) for d in root_dims]
    hit = [k for k, d in enumerate(dims) if any(a in touched for a in d)]
    if not hit:  # a single input feature: a size-1 dimension (no digit) at either end
        if dims and not dims[-1]:
            hit = [len(dims) - 1]
        elif dims and not dims[0]:
            hit = [0]
        else:
            raise Unsupported("the products do not act on the root's features")
    last, inner_dims = len(dims) - 1, 0
    if hit[-1] == last or all(not d for d in dims[hit[-1] + 1 :]):
        feature_dims, batch_last = range(hit[0], len(dims)), False
    elif hit[0] == 0 or all(not d for d in dims[: hit[0]]):
        feature_dims, batch_last = range(0, hit[-1] + 1), True
    else:
        feature_dims, batch_last, inner_dims = range(hit[0], hit[-1] + 1), True, last - hit[-1]
    features = [a for k in feature_dims for a in dims[k]]
    batch = [a for k, d in enumerate(dims) if k not in feature_dims for a in d]
    return batch, features, batch_last, inner_dims


def _layout(order: list[Atom], batch: set[Atom], what: str) -> bool | None:
    """False for batch-first, True for batch-last, None when either fits (no batch or no
    feature digit); raises if batch and features interleave."""
    flags = [a in batch for a in order]
    n_batch = sum(flags)
    if n_batch in (0, len(flags)):
        return None
    if flags == [True] * n_batch + [False] * (len(flags) - n_batch):
        return False
    if flags == [False] * (len(flags) - n_batch) + [True] * n_batch:
        return True
    raise Unsupported(f"{what} interleaves batch and feature digits")


def _new_digits(step: Factor) -> list[Atom]:
    live = leafset(step.live_before)
    new = [a for a in leaves(step.weight.core_atoms) if a not in live]
    if step.out_dims is not None:
        position = {a: k for k, a in enumerate(leaves([x for d in step.out_dims for x in d]))}
        new.sort(key=lambda a: position.get(a, len(position)))
    return new


def _factor(step: Factor, space: list[Atom], batch: set[Atom], applied: list) -> tuple[list[Atom], int]:
    summed = leafset(step.summed)
    space_set = set(space)
    if not summed <= space_set:
        raise Unsupported(f"{step.node.name} sums over a digit that is not an input feature")
    if leafset(step.live_before) != space_set | batch:
        raise Unsupported(f"{step.node.name}: internal, activation digits do not match the feature space")
    new = _new_digits(step)
    contracted = [a for a in space if a in summed]
    first = space.index(contracted[0]) if contracted else len(space)
    p_hi = [a for a in space[:first] if a not in summed]
    p_lo = [a for a in space[first:] if a not in summed]
    target = p_hi + contracted + p_lo
    pattern = KSPattern(_prod(p_hi), _prod(new), _prod(contracted), _prod(p_lo))
    ids = read_core(step.weight, p_hi + new + contracted + p_lo).reshape(pattern.as_tuple())
    source_flops = 0 if step.rest_of_split else pattern.flops(1)
    if step.whole is not None:  # the original multiplies by the whole outer-product matrix
        live, summed_whole = leafset(step.whole.live_before), leafset(step.whole.summed)
        whole_new = [a for a in leaves(step.whole.weight.core_atoms) if a not in live]
        kept = [a for a in space if a not in summed_whole]
        source_flops = 2 * _prod(kept) * _prod(whole_new) * _prod([a for a in space if a in summed_whole])
    in_perm = digit_perm(space, target)
    out_perm = None
    dense = bool((ids == 0).any())
    if dense:
        in_perm, pattern, out_perm, ids = _refine(step, pattern, ids, space, target)
    if in_perm is not None:
        applied.append(in_perm)
    applied.append((pattern, ValueSource(step.weight.source, ids.contiguous(), dense)))
    if out_perm is not None:
        applied.append(out_perm)
    return p_hi + new + p_lo, source_flops


def _refine(step: Factor, pattern: KSPattern, ids: torch.Tensor, space: list[Atom], target: list[Atom]):
    """Re-derive a factor with structural zeros from its support (masked or block-diagonal weights)."""
    rows, cols = pattern.shape
    if rows * cols > MAX_DENSE:
        raise Unsupported(f"{step.node.name}: weight with zeros is too large ({rows}x{cols}) to analyse")
    dense_t = pattern.to_dense(ids)
    dense = torch.zeros_like(dense_t)
    dense[:, _digit_source(space, target)] = dense_t
    found = factor_from_support(dense != 0)
    if found is None:
        raise Unsupported(f"{step.node.name}: the weight's support is not Kronecker-sparse")
    out_perm, refined, in_perm, row_index, col_index = found
    return in_perm, refined, out_perm, dense[row_index, col_index]


def _digit_source(space: list[Atom], target: list[Atom]) -> torch.Tensor:
    perm = digit_perm(space, target)
    return torch.arange(_prod(space)) if perm is None else perm.indices()


def factor_from_support(mask: torch.Tensor):
    """``mask == P_out · support(KS) · P_in`` as ``(P_out, pattern, P_in, rows, cols)``, or None.

    ``rows``/``cols`` (shape ``(a, b, c, d)``) give the matrix entry each value sits at.
    Identity permutations are tried first (``KSPattern.from_support``); otherwise rows
    with the same set of nonzero columns form the blocks, which must be complete,
    disjoint and all of the same ``b×c`` size. Of the two natural block orders (by first
    row, by first column) the one needing fewer permutations is kept.
    """
    direct = KSPattern.from_support(mask)
    if direct is not None:
        rows, cols = direct.index_grids()
        return None, direct, None, rows, cols
    unique, inverse = torch.unique(mask.to(torch.uint8), dim=0, return_inverse=True)
    if bool((unique.sum(1) == 0).any()) or not bool((unique.sum(0) == 1).all()):
        return None
    groups = unique.shape[0]
    counts = torch.bincount(inverse, minlength=groups)
    widths = unique.sum(1)
    if not (bool((counts == counts[0]).all()) and bool((widths == widths[0]).all())):
        return None
    b, c = int(counts[0]), int(widths[0])
    group_rows = [torch.nonzero(inverse == g).flatten() for g in range(groups)]
    group_cols = [torch.nonzero(unique[g]).flatten() for g in range(groups)]
    best = None
    for key in (lambda g: int(group_rows[g][0]), lambda g: int(group_cols[g][0])):
        order = sorted(range(groups), key=key)
        row_src = torch.cat([group_rows[g] for g in order])
        col_src = torch.cat([group_cols[g] for g in order])
        in_perm = simplify(IndexPerm(tuple(col_src.tolist())))
        out_perm = simplify(IndexPerm(tuple(torch.argsort(row_src).tolist())))
        cost = sum(not p.is_identity for p in (in_perm, out_perm))
        if best is None or cost < best[0]:
            best = (cost, out_perm, in_perm, row_src, col_src)
    _, out_perm, in_perm, row_src, col_src = best
    pattern = KSPattern(groups, b, c, 1)
    rows = row_src.reshape(groups, b, 1, 1).expand(groups, b, c, 1)
    cols = col_src.reshape(groups, 1, c, 1).expand(groups, b, c, 1)
    return _non_identity(out_perm), pattern, _non_identity(in_perm), rows, cols


def _non_identity(perm: Perm) -> Perm | None:
    return None if perm.is_identity else perm


def _perm(step: PermRec, space: list[Atom], applied: list) -> list[Atom]:
    src, new = leaves(step.src), leaves(step.new)
    src_set = set(src)
    if not src_set <= set(space):
        raise Unsupported(f"{step.node.name} permutes or reshapes batch digits")
    first = min(space.index(a) for a in src)
    kept = [a for a in space if a not in src_set]
    position = first - sum(1 for a in space[:first] if a in src_set)
    new_space = kept[:position] + new + kept[position:]
    grids = torch.meshgrid(*(torch.arange(s) for s in _sizes(new_space)), indexing="ij")
    coord = dict(zip(new_space, grids, strict=True))
    new_flat = torch.zeros_like(grids[0])
    for atom in new:
        new_flat = new_flat * atom.int_size() + coord[atom]
    source = step.table[new_flat]
    digits = {}
    for atom in reversed(src):
        digits[atom] = source % atom.int_size()
        source = source // atom.int_size()
    flat = torch.zeros_like(grids[0])
    for atom in space:
        flat = flat * atom.int_size() + (digits[atom] if atom in digits else coord[atom])
    perm = simplify(IndexPerm(tuple(flat.reshape(-1).tolist())))  # bit reversal -> digit arithmetic
    if not perm.is_identity:
        applied.append(perm)
    return new_space
