"""``KSLinear``: a drop-in for ``nn.Linear`` whose weight is a chain of KS factors."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from ksfx.ops.api import ks_matmul
from ksfx.pattern import Chain, KSPattern


class KSLinear(nn.Module):
    """``y = x @ W.T + bias`` with ``W = K_1 @ … @ K_L`` given by ``patterns`` (leftmost first).

    Init: every factor is variance-preserving (uniform with variance ``1/c``); the
    leftmost one is scaled so that ``W``'s output variance matches ``nn.Linear``'s default.
    """

    def __init__(
        self,
        patterns: Sequence[KSPattern | tuple[int, int, int, int]],
        bias: bool = True,
        *,
        batch_last: bool = False,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        self.chain = Chain.of_factors(list(patterns))
        self.batch_last = batch_last
        self.in_features = self.chain.in_features
        self.out_features = self.chain.out_features
        factory = {"device": device, "dtype": dtype}
        self.factors = nn.ParameterList(nn.Parameter(torch.empty(p.as_tuple(), **factory)) for p in self.chain.patterns)
        self.bias = nn.Parameter(torch.empty(self.out_features, **factory)) if bias else None
        self.reset_parameters()

    @property
    def patterns(self) -> tuple[KSPattern, ...]:
        return self.chain.patterns

    def reset_parameters(self) -> None:
        for k, (pattern, values) in enumerate(zip(self.chain.patterns, self.factors, strict=True)):
            bound = math.sqrt(3.0 / pattern.c)
            if k == 0:
                bound /= math.sqrt(3.0)
            nn.init.uniform_(values, -bound, bound)
        if self.bias is not None:
            bound = 1.0 / math.sqrt(self.in_features)
            nn.init.uniform_(self.bias, -bound, bound)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ks_matmul(x, list(self.factors), batch_last=self.batch_last, bias=self.bias, chain=self.chain)

    def to_dense(self) -> torch.Tensor:
        return self.chain.to_dense(list(self.factors))

    def extra_repr(self) -> str:
        patterns = ", ".join(str(p.as_tuple()) for p in self.patterns)
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"patterns=[{patterns}], bias={self.bias is not None}"
        )
