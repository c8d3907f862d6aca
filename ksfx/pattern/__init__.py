"""Symbolic descriptors of KS factors, permutations and chains (imports nothing of ksfx)."""

from ksfx.pattern.chain import Chain, Step, fuse, fuse_values, permutation_matrix, step_shape
from ksfx.pattern.ks import ALPHA, BETA, COL, DELTA, GAMMA, ROW, KSPattern
from ksfx.pattern.perm import DigitPerm, IndexPerm, J, Perm, as_digit_perm, compose, simplify
from ksfx.pattern.printer import evaluate, to_code

__all__ = [
    "ALPHA",
    "BETA",
    "COL",
    "DELTA",
    "GAMMA",
    "J",
    "ROW",
    "Chain",
    "DigitPerm",
    "IndexPerm",
    "KSPattern",
    "Perm",
    "Step",
    "as_digit_perm",
    "compose",
    "evaluate",
    "fuse",
    "fuse_values",
    "permutation_matrix",
    "simplify",
    "step_shape",
    "to_code",
]

from ksfx.pattern.plan import FactorStep, PermStep, split_chain  # noqa: E402

__all__ += ["FactorStep", "PermStep", "split_chain"]
