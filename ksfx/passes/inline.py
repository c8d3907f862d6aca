"""Which ops the backend inlines after the pass, on a CPU: the chain as aten ops.

On a CPU the rewritten chain is traced once more into plain aten ops
(:mod:`ksfx.ops.aten_chain`), so that Inductor sees and fuses them; the ``ks_chain``
call stays for GPUs (generated kernels) and for the Triton interpreter.
"""

from __future__ import annotations

import torch

from ksfx.ops.aten_chain import chain_as_aten

INLINE_ON_CPU = {torch.ops.ksfx.ks_chain.default: chain_as_aten}
