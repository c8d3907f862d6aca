"""The autotuning space: candidate tiles pruned by hardware limits and ranked by traffic.

Triton's autotuner compiles and times every config it is given, so the space must be
small. Candidates are the power-of-two tilings that fit the block shape and shared
memory; the traffic model (:mod:`.traffic`) ranks them and only the best few tilings,
each with two warp/stage variants, are kept, plus the heuristic's own choice.
"""

from __future__ import annotations

import itertools

from ksfx.codegen.tiling import (
    DOT3_ACC,
    MIN_DOT,
    SMEM_BUDGET,
    WINDOW_WIDTH,
    TileConfig,
    clamp_pow2,
    delta_tile,
    forward_heuristic,
    forward_programs,
    kernel_mode,
    widest_run,
    window_tile,
)
from ksfx.codegen.traffic import bytes_moved
from ksfx.pattern import FactorStep


def _tilings(step: FactorStep, n: int, itemsize: int, mode: str) -> list[tuple[int, int, int]]:
    p = step.pattern
    if mode in ("dot", "dot3"):
        width = delta_tile(p) if mode == "dot3" else 1  # dot3 tiles are `width` block products deep
        max_n, max_k = clamp_pow2(p.b, MIN_DOT, 128), clamp_pow2(p.c, MIN_DOT, 64)
        max_m = clamp_pow2(n, 32, 128)
        return [
            (bm, bn, bk)
            for bm, bn, bk in itertools.product((32, 64, 128), (16, 32, 64, 128), (16, 32, 64))
            if bm <= max_m
            and bn <= max_n
            and bk <= max_k
            and width * bm * bn <= 2 * DOT3_ACC
            and 3 * width * (bm * bk + bk * bn) * itemsize <= SMEM_BUDGET
        ]
    if mode == "window":  # whole blocks a program: 1, 2, 4, ... of them up to the widest run
        max_m = clamp_pow2(n, 16, 128)
        runs = [window_tile(p, 1 << k) for k in range((WINDOW_WIDTH * 2 // widest_run(p)).bit_length())]
        return [(bm, bn, bk) for bm in (16, 32, 64, 128) for bn, bk in runs if bm <= max_m and bm * bn <= 64 * 256]
    max_n, max_m = clamp_pow2(p.out_features, 16, 256), clamp_pow2(n, 16, 128)
    return [
        (bm, bn, 1)
        for bm, bn in itertools.product((16, 32, 64, 128), (16, 32, 64, 128, 256))
        if bm <= max_m and bn <= max_n and bm * bn <= 64 * 256
    ]


def _variants(mode: str, width: int, bm: int, bn: int, bk: int) -> list[TileConfig]:
    if mode in ("dot", "dot3"):
        warps = 8 if width * bm * bn >= 128 * 64 else 4
        return [TileConfig(bm, bn, bk, warps, 3), TileConfig(bm, bn, bk, warps, 4)]
    warps = max(1, min(8, bm * bn // 512))
    return [TileConfig(bm, bn, bk, warps, 1), TileConfig(bm, bn, bk, max(1, warps // 2), 1)]


def forward_config_space(
    step: FactorStep, n: int, itemsize: int, batch_last: bool, num_sms: int, tilings: int = 6
) -> list[TileConfig]:
    """At most ``2 * tilings + 1`` configs: the least-traffic tilings that still fill the GPU."""
    mode = kernel_mode(step.pattern, batch_last)
    width = delta_tile(step.pattern) if mode == "dot3" else 1
    candidates = _tilings(step, n, itemsize, mode)
    filling = [t for t in candidates if forward_programs(step.pattern, n, TileConfig(*t), mode) >= num_sms]
    candidates = filling or candidates

    deepest = {}  # the γ depth does not change traffic: keep the deepest per (block_m, block_n)
    for bm, bn, bk in candidates:
        deepest[bm, bn] = max(bk, deepest.get((bm, bn), 0))

    def cost(tiling: tuple[int, int, int]) -> tuple[int, int]:
        moved = bytes_moved(step, n, batch_last, TileConfig(*tiling), itemsize, sector=32).total
        return moved, -tiling[0] * tiling[1]

    best = sorted(((bm, bn, bk) for (bm, bn), bk in deepest.items()), key=cost)[:tilings]
    configs = [forward_heuristic(step.pattern, n, itemsize, batch_last, num_sms)]
    for config in (c for tiling in best for c in _variants(mode, width, *tiling)):
        if config not in configs:
            configs.append(config)
    return configs
