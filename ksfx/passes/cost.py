"""Per-chain decision: does replacing the region by the KS op pay?

Deliberately simple and explainable (every decision is printed by ``explain``):

* a chain whose factors are all dense (``a = d = 1``) is a plain matrix product: never
  rewritten, whatever the mode;
* ``rewrite="never"`` / ``"always"`` override everything else;
* ``"auto"`` on a GPU rewrites every chain with structure: the fused kernels remove the
  permutation passes the bmm/einsum formulations pay for (the paper's main gain);
* ``"auto"`` on a CPU (where the op runs one einsum per factor) rewrites a chain of two
  or more factors: measured end to end on the quick ViT and GPT-2 (1 thread, forward and
  training), the rewritten chains ran 5–14% faster than Inductor's code for the
  reshape/transpose/bmm originals (``benchmarks/results/models_cpu_*.json``), while one
  factor alone was measured 0–25% slower than Inductor's bmm (``patterns_cpu_*.json``):
  a single factor is rewritten only when the original computes at least twice its
  multiply-adds (masked dense and block-diagonal dense weights).
"""

from __future__ import annotations

from dataclasses import dataclass

from ksfx.pattern import Chain

MODES = ("auto", "always", "never")


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


def decide(chain: Chain, est: Estimate, mode: str, device_type: str) -> tuple[bool, str]:
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
    if 2 * est.chain_flops <= est.source_flops:
        return True, f"auto: the original computes {est.source_flops / max(est.chain_flops, 1):.1f}x the chain's FLOPs"
    if len(chain.patterns) >= 2:
        return (
            True,
            f"auto: a {len(chain.patterns)}-factor chain (measured faster than Inductor's bmm path on {device_type})",
        )
    return False, (
        f"auto: one factor on {device_type}, and the original ops already do its work "
        f"({est.source_flops} vs {est.chain_flops} FLOP/row); use rewrite='always' to force"
    )
