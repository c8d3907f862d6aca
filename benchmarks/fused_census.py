"""The static sm_90 check of the fused segments of whole chains (``python -m ksfx kernels --fuse``).

For the chains of :mod:`benchmarks.chains`, fp32 (IEEE) and bf16, both layouts, at batch
25,088: every kernel the op launches with ``ksfx.config.fuse = "always"`` (forward, and
with ``--backward`` the recomputed intermediates, dx's transposed chain and the weight
gradients), with its census, the traffic model's bytes over ``|X| + |W| + |Y|`` and the
bar of :func:`ksfx.ops.static_check.passes`. One JSON::

    python -m benchmarks.fused_census --backward --out benchmarks/results/fused_census_triton39.json
    PYTHONPATH=$PWD /tmp/venv36/bin/python -m benchmarks.fused_census --backward --out /tmp/fused36.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.chains import CHAINS

#: Monarch-style pairs (1, k1, k1, n / k1) then (n / k2, k2, k2, 1): every block size
#: 16-64 at n = 512-2048, beyond the chains above (``--grid monarch``).
MONARCH_GRID = {
    f"monarch-{n}-{k1}x{k2}": [(1, k1, k1, n // k1), (n // k2, k2, k2, 1)]
    for n in (512, 1024, 2048)
    for k1 in (16, 32, 64)
    for k2 in (16, 32, 64)
}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--chain", help=f"comma-separated names (default: {','.join(CHAINS)})")
    parser.add_argument("--grid", choices=["monarch"], help="the chains of MONARCH_GRID instead")
    parser.add_argument("--backward", action="store_true")
    parser.add_argument("--batch", type=int, default=25088)
    parser.add_argument("--device", default="H100")
    args = parser.parse_args(argv)
    import torch
    import triton

    from ksfx.ops import static_check
    from ksfx.pattern import Chain, KSPattern

    torch.set_float32_matmul_precision("highest")
    device = static_check.DEVICES[args.device]
    reports = []
    known = {**CHAINS, **MONARCH_GRID}
    names = list(MONARCH_GRID) if args.grid == "monarch" else (args.chain or ",".join(CHAINS)).split(",")
    for name in names:
        chain = Chain(tuple(KSPattern(*p) for p in known[name]))
        for dtype in (torch.float32, torch.bfloat16):
            for batch_last in (False, True):
                start = time.monotonic()
                launches = static_check.chain_launches(
                    chain, dtype, batch_last, args.batch, device, args.backward, fuse=True
                )
                for launch in launches:
                    report = static_check.check(launch, device)
                    report["problems"] = static_check.passes(report)
                    reports.append({"chain": name, **report})
                fused = [r for r in reports[-len(launches) :] if r["mode"] == "fused"]
                summary = "; ".join(f"{r['kind']} {'; '.join(r['problems']) or 'ok'}" for r in fused)
                print(f"{name} {dtype} {'batch-last' if batch_last else 'batch-first'}: {summary} "
                      f"({time.monotonic() - start:.0f} s)", file=sys.stderr)  # fmt: skip
    fused = [r for r in reports if r["mode"] == "fused"]
    out = {
        "triton": triton.__version__,
        "torch": torch.__version__,
        "target": f"sm_{device.capability}",
        "batch": args.batch,
        "fp32_precision": "highest",
        "date": time.strftime("%Y-%m-%d"),
        "fused_kernels": len(fused),
        "fused_meeting_the_bar": sum(not r["problems"] for r in fused),
        "reports": reports,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=1) + "\n")
    print(args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
