"""Launch plans: which kernel, tile, split-K and grid a W4A16 call runs, from its real shapes.

Pure functions of (M, N, K, group size, SM count), cached: the launchers call them on every
call with the run-time M (never a trace-time size hint), so a graph traced at one M launches
what the real M needs. No autotuning: the plans are fixed rules checked by the static kernel
report (benchmarks/sass_report.py), which keeps CUDA-graph capture free of benchmarking.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

# Rows up to which w4a16_matmul runs the GEMV; above it, the tiled GEMM. On the tensor cores
# (16-bit x and scales, the GEMV_MMA_BLOCK_K tile) the GEMV carries up to 8 rows of x in its
# mma's B columns, 16 as two n8 blocks (gemv._mma_rows: BLOCK_M 8 / 16 rows per program, each
# word dequantised once for all of them); elsewhere M = 1 only (one program per row would read
# the weights M times). FP4 keeps one row (FP4_GEMV_MAX_M: its GEMV has no multi-row form).
GEMV_MAX_M = 16
FP4_GEMV_MAX_M = 1
# CTAs per SM the GEMV configs reach (4 warps, <= 128 registers); the static report checks it.
GEMV_OCCUPANCY = 4
GEMV_WAVES = 2
GEMV_MAX_BLOCK_K = 512
# BLOCK_K of the tensor-core GEMV (gemv._mma_word relies on its layout: 16 words a row)
GEMV_MMA_BLOCK_K = 128
GEMV_ROWS_PER_THREAD = 4
GEMV_WARPS = 4


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    return 1 if n <= 1 else 1 << (int(n) - 1).bit_length()


@dataclass(frozen=True)
class GemvPlan:
    """A GEMV launch: tile BLOCK_N x BLOCK_K, `split_k` splits of `steps` K steps each."""

    block_n: int
    block_k: int
    num_warps: int
    split_k: int
    steps: int
    k_steps: int
    grid: tuple[int, int, int]
    block_m: int = 1  # rows of x per program (grid[0] = cdiv(M, block_m))
    kernel: str = "gemv"


def gemv_block_k(k: int, group_size: int) -> int:
    """GEMV_MMA_BLOCK_K where K has a step of it and it tiles whole groups or lies in one (the
    tensor-core GEMV's tile: 16 words a row, 4 lanes along K); otherwise the largest
    power-of-two BLOCK_K <= 512 that does (each step reads whole scales), no wider than K
    needs; at least 32 (four words per thread)."""
    mma = GEMV_MMA_BLOCK_K
    if k >= mma and (group_size % mma == 0 or (mma % group_size == 0 and group_size >= 32)):
        return mma
    cap = max(32, min(GEMV_MAX_BLOCK_K, next_power_of_2(k)))
    bk = cap
    while bk > 32 and group_size % bk and bk % group_size:
        bk //= 2
    return bk


def gemv_block_m(m: int, block_k: int) -> int:
    """Rows of x per GEMV program on the tensor cores: 1 for M = 1 (gemv._mma_word), else one
    (8) or two (16) n8 blocks of the mma's B operand (gemv._mma_rows), which needs the
    GEMV_MMA_BLOCK_K tile."""
    if m == 1 or block_k != GEMV_MMA_BLOCK_K:
        return 1
    return 8 if m <= 8 else 16


@functools.lru_cache(maxsize=4096)
def plan_gemv(
    m: int,
    n: int,
    k: int,
    group_size: int,
    sms: int,
    split_k: int | None = None,
    block_m: int | None = None,
) -> GemvPlan:
    """Tile from K and the group; rows of x per program `block_m` (default gemv_block_m: the
    tensor-core path; 1 for the CUDA cores); split K until the grid, cdiv(M, block_m) row
    blocks by the N tiles, covers GEMV_WAVES waves of the GPU at GEMV_OCCUPANCY CTAs per SM
    (or every split has a single step). `split_k` forces a split."""
    bk = gemv_block_k(k, group_size)
    if block_m is None:
        block_m = gemv_block_m(m, bk)
    # four 128-bit words per thread along K, GEMV_ROWS_PER_THREAD rows per thread
    bn = GEMV_ROWS_PER_THREAD * GEMV_WARPS * 32 * 4 // (bk // 8)
    bn = max(16, min(bn, next_power_of_2(n)))
    if split_k is None:
        k_steps = cdiv(k, bk)
        split_k = 1
        rows = cdiv(m, block_m)
        while (
            rows * cdiv(n, bn) * split_k < GEMV_WAVES * GEMV_OCCUPANCY * sms
            and split_k * 2 <= k_steps
        ):
            split_k *= 2
    return gemv_tile_plan(m, n, k, bn, bk, split_k, block_m)


# The FP4 GEMV's plan group: 32 (MXFP4's block, two NVFP4 blocks) gives the INT4 g32 tile,
# BLOCK_K 128 (NVFP4's own 16 would give 512: too few K steps to split at K = 4096).
FP4_GEMV_PLAN_GROUP = 32


# CTAs per SM the FP4 GEMV runs at, by path (CUDA cores, tensor cores): its launcher caps the
# registers to match (fp4.fp4_gemv); the tensor-core path spills under the 4-CTA cap.
FP4_GEMV_OCCUPANCY = {False: GEMV_OCCUPANCY, True: 3}


@functools.lru_cache(maxsize=4096)
def plan_fp4_gemv(
    m: int, n: int, k: int, block: int, sms: int, split_k: int | None = None, mma: bool = False
) -> GemvPlan:
    """`plan_gemv` for group FP4_GEMV_PLAN_GROUP (the FP4 block where K is not a multiple of
    it); then, split-K at its limit and the grid still short of GEMV_WAVES waves at the path's
    FP4_GEMV_OCCUPANCY, BLOCK_N halved (to 32) on the CUDA-core path (the tensor-core one
    keeps the tile gemv._mma_word's layout was checked with)."""
    group = FP4_GEMV_PLAN_GROUP if k % FP4_GEMV_PLAN_GROUP == 0 else block
    p = plan_gemv(m, n, k, group, sms, split_k, 1)
    target = GEMV_WAVES * FP4_GEMV_OCCUPANCY[mma] * sms
    while not mma and split_k is None and p.block_n > 32 and m * p.grid[1] * p.grid[2] < target:
        p = gemv_tile_plan(m, n, k, p.block_n // 2, p.block_k, p.split_k)
    return p


# The FP4 GEMM's unfused form (MXFP4 with fp16 x) keeps a second [BLOCK_M, BLOCK_N] fp32 tile
# (the block's dot, before its scale) beside the accumulator: from BLOCK_M 64 its BLOCK_N is
# capped so the two fit without spills.
FP4_GEMM_MAX_BLOCK_N = 64
FP4_GEMM_WIDE_MIN_BLOCK_M = 64


def plan_fp4_gemm(
    m: int,
    n: int,
    k: int,
    block_k: int,
    sms: int,
    split_k: int | None = None,
    narrow: bool = False,
) -> GemmPlan:
    """`plan_gemm` with BLOCK_K at most `block_k` (a multiple of the FP4 block dividing K);
    `narrow`: BLOCK_N capped at FP4_GEMM_MAX_BLOCK_N for BLOCK_M >= FP4_GEMM_WIDE_MIN_BLOCK_M."""
    p = plan_gemm(m, n, k, block_k, sms, split_k, swap=False)
    if narrow and p.block_m >= FP4_GEMM_WIDE_MIN_BLOCK_M and p.block_n > FP4_GEMM_MAX_BLOCK_N:
        p = plan_gemm(m, n, k, block_k, sms, split_k, FP4_GEMM_MAX_BLOCK_N, swap=False)
    return p


def gemv_tile_plan(
    m: int, n: int, k: int, block_n: int, block_k: int, split_k: int, block_m: int = 1
) -> GemvPlan:
    """The GEMV launch of a given tile and split (splits without a K step are dropped)."""
    k_steps = cdiv(k, block_k)
    steps = cdiv(k_steps, max(1, split_k))
    split = cdiv(k_steps, steps)
    return GemvPlan(block_n, block_k, GEMV_WARPS, split, steps, k_steps,
                    (cdiv(m, block_m), cdiv(n, block_n), split), block_m)  # fmt: skip


@dataclass(frozen=True)
class GemmPlan:
    """A tensor-core GEMM launch: tile BLOCK_M x BLOCK_N x BLOCK_K, split-K, warps, stages."""

    block_m: int
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int
    split_k: int
    grid: tuple[int, int, int]
    kernel: str = "gemm"
    swap: bool = False  # weight rows as the dot's M, x rows its N (small M: GEMM_SWAP_MAX_M)


# (largest M, BLOCK_M, BLOCK_N, BLOCK_K, warps, stages): the tile grows with the real M.
GEMM_TILES = (
    (16, 16, 128, 128, 4, 4),
    (32, 32, 64, 128, 4, 4),
    (64, 64, 128, 64, 4, 4),
    (None, 128, 128, 64, 8, 3),
)
# The INT4 GEMM up to GEMM_SWAP_MAX_M rows, operands swapped: BLOCK_N weight rows are the dot's
# M side (64 or 128: Hopper's wgmma, M 64 a warpgroup, A dequantised in registers) and the x
# rows its N (8..256 on wgmma), so a batch of 16-64 rows no longer runs m16 mma.sync tiles with
# the weight tile through shared memory; BLOCK_K may span several groups (one scale per row and
# group; 16-bit x and scales: gemm.load_dequant_packed, the packed 16-bit dequant, else
# common.load_dequant_rows). 128 weight rows a program (64 halved the waves and cost 0.5-1
# more instruction per weight in the static report); 8 warps above 32 rows (4 warps spilled
# there with zero points at group 32 in the fp32 form; with the packed dequant 4 warps reach
# 3.4-3.6 instructions per weight against 8 warps' 4.2-4.6, but at 230-255 registers).
GEMM_SWAP_TILES = (
    (16, 16, 128, 128, 4, 4),
    (32, 32, 128, 128, 4, 3),
    (64, 64, 128, 128, 8, 3),
)
GEMM_SWAP_MAX_M = GEMM_SWAP_TILES[-1][0]
GEMM_MAX_SPLIT_K = 16


@functools.lru_cache(maxsize=4096)
def plan_gemm(
    m: int,
    n: int,
    k: int,
    group_size: int,
    sms: int,
    split_k: int | None = None,
    max_block_n: int | None = None,
    swap: bool = True,
) -> GemmPlan:
    """The tile row for this M (GEMM_SWAP_TILES up to GEMM_SWAP_MAX_M rows when `swap`, the
    INT4 kernel's swapped operands; GEMM_TILES otherwise), BLOCK_K narrowed to K and to lie
    within a group (swapped: or to span whole groups), BLOCK_N to `max_block_n` when given;
    split K until the output tiles cover the SMs."""
    swap = swap and m <= GEMM_SWAP_MAX_M
    row = (
        next(r for r in GEMM_SWAP_TILES if m <= r[0])
        if swap
        else next(r for r in GEMM_TILES if r[0] is None or m <= r[0])
    )
    _, bm, bn, bk, warps, stages = row

    def tiles_groups(b: int) -> bool:  # whole groups (swapped loader), or inside one group
        return group_size % b == 0 or (swap and b % group_size == 0)

    while bk > 16 and (not tiles_groups(bk) or bk > max(16, next_power_of_2(k))):
        bk //= 2
    bn = max(16, min(bn, next_power_of_2(n), max_block_n or bn))
    tiles = cdiv(m, bm) * cdiv(n, bn)
    k_blocks = cdiv(k, bk)
    if split_k is None:
        split_k = 1
        while tiles * split_k < sms and split_k * 2 <= min(k_blocks, GEMM_MAX_SPLIT_K):
            split_k *= 2
    grid = (cdiv(m, bm), cdiv(n, bn), split_k)
    return GemmPlan(bm, bn, bk, warps, stages, split_k, grid, swap=swap)


@dataclass(frozen=True)
class DequantPlan:
    """Large M: dequantize the weight once (tiles BLOCK_N x BLOCK_K), then torch's matmul."""

    block_n: int = 32
    block_k: int = 128
    kernel: str = "dequant_matmul"


def plan_dequant(group_size: int) -> DequantPlan:
    """BLOCK_K 128, or the group where a group of 32 or 64 is narrower (one scale per row per
    tile instead of one gathered per weight)."""
    return DequantPlan(block_k=group_size if group_size in (32, 64) else 128)


# Rows from which w4a16_matmul dequantizes the weight once and calls cuBLAS. Static estimate
# (no GPU timing yet): the extra ~4.5 bytes per weight cost, for 4096 x 4096, ~16 us at HBM
# rate, against ~50 us of bf16 matmul at M = 2048, while the fused GEMM's in-loop dequant
# keeps it at 0.6-1.7x cuBLAS (issue 14); benchmarks/cuda_linear.py measures the crossover.
DEQUANT_MATMUL_MIN_M = 2048


def plan_linear(
    m: int, n: int, k: int, group_size: int, sms: int, mma: bool = True
) -> GemvPlan | GemmPlan | DequantPlan:
    """What w4a16_matmul launches for x [M, K] and a weight [N, K] of this group size; `mma`:
    whether the GEMV can take its tensor-core path (16-bit x and scales, on the GPU: see
    gemv.gemv_mma), which M = 2..GEMV_MAX_M needs (with the GEMV_MMA_BLOCK_K tile)."""
    if m == 1 or (m <= GEMV_MAX_M and mma and gemv_block_k(k, group_size) == GEMV_MMA_BLOCK_K):
        return plan_gemv(m, n, k, group_size, sms)
    if m >= DEQUANT_MATMUL_MIN_M:
        return plan_dequant(group_size)
    return plan_gemm(m, n, k, group_size, sms)


@dataclass(frozen=True)
class GroupedPlan:
    """An MoE launch: the per-row kernel ("grouped", decode) or the sorted grouped GEMM
    ("grouped_gemm", prefill: tiles BLOCK_M x BLOCK_N x BLOCK_K of one expert's rows)."""

    kernel: str
    block_m: int = 0
    block_n: int = 0
    block_k: int = 0
    num_warps: int = 4
    num_stages: int = 3


# Routed rows per expert (on average) from which the sorted grouped GEMM replaces the per-row
# kernel: from there a BLOCK_M = 16 tile reads an expert's weights once for several rows
# instead of once per row; and at least this many rows in all.
GROUPED_GEMM_MIN_ROWS_PER_EXPERT = 4
GROUPED_GEMM_MIN_ROWS = 16


@functools.lru_cache(maxsize=4096)
def plan_grouped(t: int, n: int, k: int, group_size: int, experts: int) -> GroupedPlan:
    """The per-row kernel for few routed rows; else the sorted grouped GEMM, BLOCK_M growing
    with the rows per expert, BLOCK_K narrowed to lie within a group and to K."""
    if t < max(GROUPED_GEMM_MIN_ROWS, GROUPED_GEMM_MIN_ROWS_PER_EXPERT * experts):
        return GroupedPlan("grouped")
    per_expert = cdiv(t, experts)
    bm = 16 if per_expert <= 16 else 32 if per_expert <= 32 else 64
    bk = 64
    while bk > 16 and (group_size % bk or bk > max(16, next_power_of_2(k))):
        bk //= 2
    bn = max(16, min(128, next_power_of_2(n)))
    return GroupedPlan("grouped_gemm", bm, bn, bk, 4, 3)
