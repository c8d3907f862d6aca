"""Per-chain decision: does replacing the region by the KS op pay?

Deliberately simple and explainable (every decision is printed by ``explain``):

* a chain whose factors are all dense (``a = d = 1``) is a plain matrix product: never
  rewritten, whatever the mode;
* ``rewrite="never"`` / ``"always"`` override everything else;
* ``"auto"`` on a GPU rewrites every chain with structure: the fused kernels remove the
  permutation passes the bmm/einsum formulations pay for (the paper's main gain);
* ``"auto"`` on a CPU (where the op runs one einsum per factor, opaque to Inductor)
  rewrites only what a committed measurement backs: an original that computes at least
  twice the chain's multiply-adds (masked dense and block-diagonal dense weights), which
  the op beat by 1.5-26x against the dense product of the materialised factor
  (:data:`CPU_SOURCE`, batch 2048, fp32, 1 thread). A bmm/einsum chain is left to
  Inductor: one factor ran at 0.74-1.04x of Inductor's bmm in the same file, and no
  committed measurement shows the op ahead of Inductor for a chain at real token
  counts (the quick models' gain came from 17-token models on which Inductor trails
  eager).
"""

from __future__ import annotations

from dataclasses import dataclass

from ksfx.pattern import Chain

MODES = ("auto", "always", "never")
#: The measurement behind the CPU policy for the opaque op (``benchmarks/results``).
CPU_SOURCE = "benchmarks/results/patterns_cpu_2026-11-23.json"
#: The grid behind the CPU policy for chains inlined as aten ops, and what it measured
#: for ``backend="ksfx"`` against Inductor on the original ops (a test checks the file).
CPU_INLINE_SOURCE = "benchmarks/results/cpu_grid_cpu_2026-12-01.json"
CPU_INLINE_MEASURED = (
    "Inductor time / ksfx time on KS blocks: median 1.52x, 0.89-9.10x over 112 points, 0 slower beyond the spread"
)


@dataclass(frozen=True)
class Estimate:
    """Per batch row (one input vector)."""

    chain_flops: int
    source_flops: int  # what the original ops compute
    dense_flops: int
    chain_bytes: int  # lower bound: read x, the factors, write y (fp32)

    def __str__(self) -> str:
        return (
            f"{self.chain_flops} FLOP/row (original {self.source_flops}, dense {self.dense_flops}), "
            f">= {self.chain_bytes} B/row"
        )


def estimate(chain: Chain, source_flops: int, itemsize: int = 4) -> Estimate:
    return Estimate(chain.flops(1), source_flops, chain.dense_flops(1), chain.min_bytes(1, itemsize))


def decide(chain: Chain, est: Estimate, mode: str, device_type: str, inline: bool = False) -> tuple[bool, str]:
    """``(rewrite?, reason)``; ``inline``: on a CPU the chain would run as inlined aten ops."""
    if mode not in MODES:
        raise ValueError(f"rewrite must be one of {MODES}, got {mode!r}")
    if all(p.a * p.d == 1 for p in chain.patterns):
        return False, "dense matrix product (no Kronecker structure): left to the compiler"
    if mode == "never":
        return False, "rewrite='never'"
    if mode == "always":
        return True, "rewrite='always'"
    if device_type == "cuda":
        return True, "auto: structured chain on GPU, fused kernels remove the permutation passes"
    if inline:
        return True, f"auto: on {device_type} inlined as aten ops ({CPU_INLINE_MEASURED}, {CPU_INLINE_SOURCE})"
    if 2 * est.chain_flops <= est.source_flops:
        return True, (
            f"auto: the original computes {est.source_flops / max(est.chain_flops, 1):.1f}x the chain's FLOPs "
            f"(the op measured 1.5-26x faster than such dense products on cpu, {CPU_SOURCE})"
        )
    return False, (
        f"auto: on {device_type} the original ops already do the chain's work ({est.source_flops} vs "
        f"{est.chain_flops} FLOP/row) and Inductor fuses around them; the op measured 0.74-1.04x of "
        f"Inductor's bmm per factor ({CPU_SOURCE}); use rewrite='always' to force"
    )
