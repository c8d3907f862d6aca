"""Print integer index expressions as ``//``/``%`` code, shared by Triton codegen and torch.

Both the generated kernels and the reference path evaluate the *same* printed string,
so an index map is defined exactly once (in :mod:`ksfx.pattern`).
"""

from __future__ import annotations

import sympy
import torch
from sympy.printing.pycode import PythonCodePrinter


class IntegerIndexPrinter(PythonCodePrinter):
    """Python-syntax printer that keeps integer semantics: floor(p/q) -> (p // q)."""

    def _print_floor(self, expr: sympy.floor) -> str:
        numerator, denominator = sympy.fraction(sympy.together(expr.args[0]))
        if denominator == 1:
            return self._print(numerator)
        return f"(({self._print(numerator)}) // {self._print(denominator)})"

    def _print_Mod(self, expr: sympy.Mod) -> str:
        value, modulus = expr.args
        return f"(({self._print(value)}) % {self._print(modulus)})"

    def _print_Rational(self, expr: sympy.Rational) -> str:
        raise ValueError(f"non-integer coefficient {expr} in an index expression")


def to_code(expr: sympy.Expr) -> str:
    """Integer-arithmetic source for ``expr`` (valid Python and Triton)."""
    return IntegerIndexPrinter().doprint(sympy.sympify(expr))


def evaluate(expr: sympy.Expr, env: dict) -> torch.Tensor:
    """Evaluate ``expr`` with symbols bound to integer tensors (or ints) in ``env``."""
    names = {str(symbol): value for symbol, value in env.items()}
    result = eval(to_code(expr), {"__builtins__": {}}, names)  # noqa: S307 - our own printed code
    return result if isinstance(result, torch.Tensor) else torch.tensor(result, dtype=torch.long)
