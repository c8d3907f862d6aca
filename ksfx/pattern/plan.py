"""How a chain runs as single-factor steps with permutations folded into their loads/stores.

Each :class:`FactorStep` computes ``y = out_perm(K(in_perm(x)))`` on the feature index:
``in_perm`` is folded into the loads of ``x``, ``out_perm`` into the stores of ``y``.
Steps are listed in *application* order (the rightmost factor of ``W`` runs first).
"""

from __future__ import annotations

from dataclasses import dataclass

from ksfx.pattern.chain import Chain
from ksfx.pattern.ks import KSPattern
from ksfx.pattern.perm import Perm, compose


@dataclass(frozen=True)
class FactorStep:
    """One kernel launch: a KS factor with optional permutations on either side."""

    pattern: KSPattern
    in_perm: Perm | None = None
    out_perm: Perm | None = None

    def transpose(self) -> FactorStep:
        """The step computing the transposed map (for ``dX``): roles of the perms swap."""
        return FactorStep(
            self.pattern.transpose(),
            None if self.out_perm is None else self.out_perm.inverse(),
            None if self.in_perm is None else self.in_perm.inverse(),
        )

    def __str__(self) -> str:
        parts = [str(self.pattern)]
        if self.in_perm is not None:
            parts.append(f"in={self.in_perm}")
        if self.out_perm is not None:
            parts.append(f"out={self.out_perm}")
        return " ".join(parts)


@dataclass(frozen=True)
class PermStep:
    """A chain with no factor at all: a single gather."""

    perm: Perm


def split_chain(chain: Chain) -> list[FactorStep] | PermStep:
    """Application-ordered launches; permutations fold into the *next* factor's loads.

    Permutations after the last applied factor (the left end of ``W``) fold into its
    stores. A chain of permutations only becomes one :class:`PermStep`.
    """
    chain = chain.simplified()
    if not chain.patterns:
        perm = chain.steps[0]
        return PermStep(perm)
    steps: list[FactorStep] = []
    pending: Perm | None = None
    for step in reversed(chain.steps):  # application order
        if isinstance(step, KSPattern):
            steps.append(FactorStep(step, in_perm=_non_identity(pending)))
            pending = None
        else:
            pending = step if pending is None else compose(pending, step)
    if pending is not None and not pending.is_identity:
        last = steps[-1]
        steps[-1] = FactorStep(last.pattern, last.in_perm, pending)
    return steps


def _non_identity(perm: Perm | None) -> Perm | None:
    return None if perm is None or perm.is_identity else perm
