"""W4A16 grouped GEMV for MoE experts: row t of x uses expert expert_ids[t]'s packed weight.

The batched_mm form: rows need not be sorted by expert. Each program owns one row and BLOCK_N
output columns, reads that row's expert id, and runs the GEMV loop (`common.gemv_row`) on that
expert's packed weight (dequant in registers, rounding to x.dtype, fp32 products and sums).
Built for decode (few rows per expert); rows sharing an expert re-read its weight (from L2).
An expert id outside [0, E) never reads out of bounds: its row comes out NaN, so the error
cannot pass unnoticed.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from qatpass.kernels.triton.common import (
    cast_rne,
    fitting_configs,
    gemv_row,
    interpreting,
    launch,
)
from qatpass.kernels.triton.plan import cdiv, next_power_of_2

GROUPED_CONFIGS = [
    triton.Config({"BLOCK_N": 32, "BLOCK_K": 128}, num_warps=4, num_stages=2),
    triton.Config({"BLOCK_N": 16, "BLOCK_K": 256}, num_warps=4, num_stages=2),
    triton.Config({"BLOCK_N": 64, "BLOCK_K": 64}, num_warps=4, num_stages=3),
    triton.Config({"BLOCK_N": 128, "BLOCK_K": 32}, num_warps=4, num_stages=3),
    triton.Config({"BLOCK_N": 64, "BLOCK_K": 128}, num_warps=8, num_stages=2),
]


def prune_grouped_configs(configs: list, named_args: dict, **kwargs) -> list:
    """Drop tiles wider than K or N, prefer BLOCK_K within a group."""
    args = {**named_args, **kwargs}
    k_cap = max(64, next_power_of_2(args["K"]))
    n_cap = max(8, next_power_of_2(args["N"]))
    return fitting_configs(
        configs,
        lambda c: c.kwargs["BLOCK_K"] <= k_cap and c.kwargs["BLOCK_N"] <= n_cap,
        args["GROUP_SIZE"],
    )


@functools.lru_cache(maxsize=1024)
def grouped_config(n: int, k: int, group_size: int) -> triton.Config:
    """The first config that fits (a fixed choice: nothing is benchmarked, so a CUDA-graph
    capture never autotunes)."""
    return prune_grouped_configs(GROUPED_CONFIGS, {"N": n, "K": k, "GROUP_SIZE": group_size})[0]


@triton.jit
def w4a16_grouped_kernel(
    # tensors
    x_ptr,  # fp16/bf16/fp32 [T, K]
    expert_ids_ptr,  # int32/int64 [T]
    qbytes_ptr,  # uint8 [E, N, K/2]: qweight's bytes, nibble k % 2 of byte k // 2 (low = even k)
    scales_ptr,  # fp16/bf16/fp32 [E, N, K/G]
    zeros_ptr,  # int8 [E, N, K/G] signed zero-point codes, or None
    bias_ptr,  # [E, N] or None
    out_ptr,  # x.dtype [T, N]
    # sizes
    N,
    K,
    E,
    # strides (elements)
    stride_xt,
    stride_xk,
    stride_qe,  # bytes
    stride_qn,  # bytes
    stride_se,
    stride_sn,
    stride_ze,
    stride_zn,
    stride_be,
    stride_ot,
    stride_on,
    # meta
    GROUP_SIZE: tl.constexpr,
    HAS_ZEROS: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    EVEN_K: tl.constexpr,  # K % BLOCK_K == 0: no mask along K
    INTERPRET: tl.constexpr,  # Triton interpreter: one config, bf16 rounding done by hand
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """out[t, n] = sum_k x[t, k] * w[expert_ids[t], n, k]; grid (T, N/BLOCK_N).

    Rows on axis 0: it has no 65535 limit (T can be tokens x top-k of a long prefill)."""
    row = tl.program_id(0).to(tl.int64)
    pid_n = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    expert = tl.load(expert_ids_ptr + row).to(tl.int64)
    valid = (expert >= 0) & (expert < E)
    expert = tl.where(valid, expert, 0)

    out_row = gemv_row(
        x_ptr + row * stride_xt, stride_xk, qbytes_ptr + expert * stride_qe,
        scales_ptr + expert * stride_se,
        zeros_ptr + expert * stride_ze if HAS_ZEROS else zeros_ptr,
        offs_n, 0, tl.cdiv(K, BLOCK_K), N, K, stride_qn, stride_sn, stride_zn,
        GROUP_SIZE=GROUP_SIZE, HAS_ZEROS=HAS_ZEROS, EVEN_K=EVEN_K, INTERPRET=INTERPRET,
        BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K,
    )  # fmt: skip

    mask_n = offs_n < N
    if HAS_BIAS:
        bias = tl.load(bias_ptr + expert * stride_be + offs_n, mask=mask_n, other=0.0)
        out_row += bias.to(tl.float32)
    out_row = tl.where(valid, out_row, float("nan"))
    out = out_ptr + row * stride_ot + offs_n * stride_on
    tl.store(out, cast_rne(out_row, out_ptr.dtype.element_ty, INTERPRET), mask=mask_n)


def w4a16_grouped(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor | None,
    *,
    expert_ids: torch.Tensor,
    group_size: int,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """x [T, K] with per-row experts @ W[e].T for checked, contiguous inputs -> [T, N]."""
    t, k = x.shape
    e, n, _ = qweight.shape
    out = torch.empty((t, n), device=x.device, dtype=x.dtype)

    config = grouped_config(n, k, group_size)

    launch(
        w4a16_grouped_kernel,
        (t, cdiv(n, config.kwargs["BLOCK_N"])),
        dict(
            x_ptr=x,
            expert_ids_ptr=expert_ids,
            qbytes_ptr=qweight.view(torch.uint8),
            scales_ptr=scales,
            zeros_ptr=zeros,
            bias_ptr=bias,
            out_ptr=out,
            N=n,
            K=k,
            E=e,
            stride_xt=x.stride(0),
            stride_xk=x.stride(1),
            stride_qe=qweight.stride(0) * 4,
            stride_qn=qweight.stride(1) * 4,
            stride_se=scales.stride(0),
            stride_sn=scales.stride(1),
            stride_ze=0 if zeros is None else zeros.stride(0),
            stride_zn=0 if zeros is None else zeros.stride(1),
            stride_be=0 if bias is None else bias.stride(0),
            GROUP_SIZE=group_size,
            HAS_ZEROS=zeros is not None,
            HAS_BIAS=bias is not None,
            EVEN_K=k % config.kwargs["BLOCK_K"] == 0,
            INTERPRET=interpreting(),
            stride_ot=out.stride(0),
            stride_on=out.stride(1),
            num_warps=config.num_warps,
            num_stages=config.num_stages,
            **config.kwargs,
        ),
    )
    return out
