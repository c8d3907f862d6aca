"""The KS chain op: runtime dispatch, autograd and launch statistics (imports codegen, pattern)."""

from ksfx.ops.api import chain_of, ks_matmul
from ksfx.ops.chain_op import ks_chain
from ksfx.ops.race import races
from ksfx.ops.stats import stats

__all__ = ["chain_of", "ks_chain", "ks_matmul", "races", "stats"]
