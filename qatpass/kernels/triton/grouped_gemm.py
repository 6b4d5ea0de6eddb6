"""W4A16 grouped GEMM for MoE prefill: rows sorted by expert, tensor-core tiles per expert.

With many routed rows (`plan.plan_grouped`), re-reading an expert's weight once per row (the
per-row kernel, grouped.py) wastes bandwidth; instead the rows are sorted by expert (a stable
argsort on the device) and each program computes a [BLOCK_M, BLOCK_N] tile of one expert's
rows: the expert's packed weight tile is loaded and dequantized once per BLOCK_M rows
(`common.load_dequant`, rounded to x.dtype like `qatpass.dequantize(p, dtype=x.dtype)`) and
fed to `tl.dot` with fp32 accumulation; rows are gathered from x and scattered back to their
place in the output (each output row written by one program: deterministic).

The tile table (expert, first sorted row, end row of each tile) is built with torch ops on the
device, with no host sync (CUDA-graph safe): the grid is the bound cdiv(T, BLOCK_M) + E + 1
tiles (each expert adds at most one partial tile; the extra bucket holds rows whose expert id
lies outside [0, E), which come out NaN as in the per-row kernel); tiles past the last one
have no rows and store nothing. DOT_FP32 upcasts the dot operands (interpreter, fp32 x), as in
the GEMM.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from qatpass.kernels.triton.common import (
    cast_rne,
    dot_acc,
    interpreting,
    launch,
    load_dequant,
    use_fp32_dot,
)
from qatpass.kernels.triton.plan import GroupedPlan, cdiv


@triton.jit
def w4a16_grouped_gemm_kernel(
    # tensors
    x_ptr,  # fp16/bf16/fp32 [T, K]
    order_ptr,  # int64 [T]: row indices sorted by expert
    tile_expert_ptr,  # int64 [TILES]: the tile's expert (E: out-of-range ids, NaN rows)
    tile_row0_ptr,  # int64 [TILES]: the tile's first position in `order`
    tile_row_end_ptr,  # int64 [TILES]: one past the expert's last position (0: no rows)
    qbytes_ptr,  # uint8 [E, N, K/2]: qweight's bytes, nibble k % 2 of byte k // 2
    scales_ptr,  # fp16/bf16/fp32 [E, N, K/G]
    zeros_ptr,  # int8 [E, N, K/G] or None
    bias_ptr,  # [E, N] or None
    out_ptr,  # x.dtype [T, N]
    # sizes
    N,
    K,
    E,
    # strides (elements; qbytes in bytes)
    stride_xt,
    stride_qe,
    stride_qn,
    stride_se,
    stride_sn,
    stride_ze,
    stride_zn,
    stride_be,
    stride_ot,
    # meta
    GROUP_SIZE: tl.constexpr,
    HAS_ZEROS: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    EVEN_K: tl.constexpr,
    DOT_FP32: tl.constexpr,
    INTERPRET: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """out[order[p]] = x[order[p]] @ w[e].T for the tile's sorted positions p; grid (TILES,
    N / BLOCK_N), tiles on axis 0 (no 65535 limit)."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    expert = tl.load(tile_expert_ptr + pid_m)
    valid = expert < E
    expert = tl.where(valid, expert, 0)
    pos = tl.load(tile_row0_ptr + pid_m) + tl.arange(0, BLOCK_M)
    mask_m = pos < tl.load(tile_row_end_ptr + pid_m)
    rows = tl.load(order_ptr + pos, mask=mask_m, other=0)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    q_e = qbytes_ptr + expert * stride_qe
    s_e = scales_ptr + expert * stride_se
    z_e = zeros_ptr + expert * stride_ze if HAS_ZEROS else zeros_ptr
    x_rows = x_ptr + rows[:, None] * stride_xt

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for kb in range(0, tl.cdiv(K, BLOCK_K)):
        k0 = kb * BLOCK_K
        offs_k = k0 + tl.arange(0, BLOCK_K)
        w = load_dequant(
            q_e, s_e, z_e, offs_n, k0, N, K, stride_qn, stride_sn, stride_zn,
            GROUP_SIZE=GROUP_SIZE, HAS_ZEROS=HAS_ZEROS, EVEN_K=EVEN_K,
            BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K,
        )  # fmt: skip
        w = cast_rne(w, x_ptr.dtype.element_ty, INTERPRET)
        mask_x = mask_m[:, None] if EVEN_K else mask_m[:, None] & (offs_k[None, :] < K)
        x_tile = tl.load(x_rows + offs_k[None, :], mask=mask_x, other=0.0)
        acc = dot_acc(x_tile, w, acc, DOT_FP32)

    if HAS_BIAS:
        bias = tl.load(bias_ptr + expert * stride_be + offs_n, mask=mask_n, other=0.0)
        acc += bias.to(tl.float32)[None, :]
    acc = tl.where(valid, acc, float("nan"))
    out = out_ptr + rows[:, None] * stride_ot + offs_n[None, :]
    tl.store(out, cast_rne(acc, out_ptr.dtype.element_ty, INTERPRET),
             mask=mask_m[:, None] & mask_n[None, :])  # fmt: skip


def tile_table(expert_ids: torch.Tensor, num_experts: int, block_m: int) -> tuple:
    """(order, tile_expert, tile_row0, tile_row_end) for rows grouped by expert in tiles of
    block_m, built on the device without a host sync (see the module docstring)."""
    t = expert_ids.shape[0]
    dev = expert_ids.device
    ids = expert_ids.to(torch.int64)
    ids = torch.where((ids >= 0) & (ids < num_experts), ids, num_experts)  # bucket E: bad ids
    order = torch.argsort(ids, stable=True)
    counts = torch.zeros(num_experts + 1, dtype=torch.int64, device=dev)
    counts.scatter_add_(0, ids, torch.ones_like(ids))
    row_end = torch.cumsum(counts, 0)
    tiles = (counts + (block_m - 1)) // block_m
    tile_end = torch.cumsum(tiles, 0)
    p = torch.arange(cdiv(t, block_m) + num_experts + 1, device=dev)
    expert = torch.searchsorted(tile_end, p, right=True)  # tile_end[e-1] <= p < tile_end[e]
    e = expert.clamp(max=num_experts)
    used = expert <= num_experts
    tile_row0 = (row_end - counts)[e] + (p - (tile_end - tiles)[e]) * block_m
    tile_row_end = torch.where(used, row_end[e], 0)
    return order, expert, tile_row0, tile_row_end


def w4a16_grouped_gemm(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor | None,
    *,
    expert_ids: torch.Tensor,
    group_size: int,
    bias: torch.Tensor | None,
    plan: GroupedPlan,
) -> torch.Tensor:
    """x [T, K] with per-row experts @ W[e].T for checked, contiguous inputs -> [T, N]."""
    t, k = x.shape
    e, n, _ = qweight.shape
    if x.stride(1) != 1:
        x = x.contiguous()
    out = torch.empty((t, n), device=x.device, dtype=x.dtype)
    order, tile_expert, tile_row0, tile_row_end = tile_table(expert_ids, e, plan.block_m)
    launch(
        w4a16_grouped_gemm_kernel,
        (tile_expert.shape[0], cdiv(n, plan.block_n)),
        dict(
            x_ptr=x,
            order_ptr=order,
            tile_expert_ptr=tile_expert,
            tile_row0_ptr=tile_row0,
            tile_row_end_ptr=tile_row_end,
            qbytes_ptr=qweight.view(torch.uint8),
            scales_ptr=scales,
            zeros_ptr=zeros,
            bias_ptr=bias,
            out_ptr=out,
            N=n,
            K=k,
            E=e,
            stride_xt=x.stride(0),
            stride_qe=qweight.stride(0) * 4,
            stride_qn=qweight.stride(1) * 4,
            stride_se=scales.stride(0),
            stride_sn=scales.stride(1),
            stride_ze=0 if zeros is None else zeros.stride(0),
            stride_zn=0 if zeros is None else zeros.stride(1),
            stride_be=0 if bias is None else bias.stride(0),
            stride_ot=out.stride(0),
            GROUP_SIZE=group_size,
            HAS_ZEROS=zeros is not None,
            HAS_BIAS=bias is not None,
            EVEN_K=k % plan.block_k == 0,
            DOT_FP32=use_fp32_dot(x),
            INTERPRET=interpreting(),
            BLOCK_M=plan.block_m,
            BLOCK_N=plan.block_n,
            BLOCK_K=plan.block_k,
            num_warps=plan.num_warps,
            num_stages=plan.num_stages,
        ),
    )
    return out
