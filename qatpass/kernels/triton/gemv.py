"""W4A16 GEMV for decode (M = 1): CUDA cores, one row per program, optionally split along K.

Each program owns BLOCK_N output columns of one row of x and one contiguous slice of K, and runs
`common.gemv_row`: the packed bytes of the weight are loaded once (vectorized), split into
nibbles in registers, dequantized, rounded to the activation dtype (the rounding of
`qatpass.dequantize(p, dtype=x.dtype)`) and multiplied with x in fp32. With SPLIT_K > 1 it
writes fp32 partials that `splitk_reduce` sums in a fixed order (deterministic). The dispatcher
sends only M == 1 here (CUDA-core FMAs per weight grow with M; from M = 2 the tensor-core GEMM
with split-K keeps up with HBM better); more rows simply run more programs.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from qatpass.kernels.triton.common import (
    cast_rne,
    choose_split_k,
    even_k,
    fitting_configs,
    gemv_row,
    interpreting,
    launch,
    next_power_of_2,
    num_sms,
    size_hint,
)
from qatpass.kernels.triton.splitk_reduce import splitk_reduce

# BLOCK_N used to judge whether the output alone fills the GPU (split-K decision).
NOMINAL_BLOCK_N = 16
NOMINAL_BLOCK_K = 256

# Small BLOCK_K (<= group size) keeps one scale per row per step; tall BLOCK_N shares each x
# load across more rows. Both shapes are here; autotuning picks per (N, K, group size).
GEMV_CONFIGS = [
    triton.Config({"BLOCK_N": 32, "BLOCK_K": 128}, num_warps=4, num_stages=2),
    triton.Config({"BLOCK_N": 16, "BLOCK_K": 256}, num_warps=4, num_stages=2),
    triton.Config({"BLOCK_N": 64, "BLOCK_K": 64}, num_warps=4, num_stages=3),
    triton.Config({"BLOCK_N": 128, "BLOCK_K": 32}, num_warps=4, num_stages=3),
    triton.Config({"BLOCK_N": 64, "BLOCK_K": 128}, num_warps=4, num_stages=2),
    triton.Config({"BLOCK_N": 128, "BLOCK_K": 64}, num_warps=8, num_stages=2),
    triton.Config({"BLOCK_N": 256, "BLOCK_K": 32}, num_warps=8, num_stages=2),
    triton.Config({"BLOCK_N": 32, "BLOCK_K": 256}, num_warps=8, num_stages=2),
    triton.Config({"BLOCK_N": 8, "BLOCK_K": 512}, num_warps=4, num_stages=2),
]


def prune_gemv_configs(configs: list, named_args: dict, **kwargs) -> list:
    """Drop tiles wider than K or N, prefer BLOCK_K within a group; one under the interpreter."""
    args = {**named_args, **kwargs}
    k_cap = max(64, next_power_of_2(args["K"]))
    n_cap = max(8, next_power_of_2(args["N"]))
    kept = fitting_configs(
        configs,
        lambda c: c.kwargs["BLOCK_K"] <= k_cap and c.kwargs["BLOCK_N"] <= n_cap,
        args["GROUP_SIZE"],
    )
    return kept[:1] if args["INTERPRET"] else kept


@triton.autotune(
    configs=GEMV_CONFIGS,
    key=["N", "K", "GROUP_SIZE", "SPLIT_K"],
    prune_configs_by={"early_config_prune": prune_gemv_configs},
)
@triton.jit
def w4a16_gemv_kernel(
    # tensors
    x_ptr,  # fp16/bf16/fp32 [M, K]
    qbytes_ptr,  # uint8 [N, K/2]: qweight's bytes, nibble k % 2 of byte k // 2 (low = even k)
    scales_ptr,  # fp16/bf16/fp32 [N, K/G]
    zeros_ptr,  # int8 [N, K/G] signed zero-point codes, or None
    bias_ptr,  # [N] or None (added in the reduce kernel when SPLIT_K > 1)
    out_ptr,  # x.dtype [M, N] when SPLIT_K == 1, else fp32 partials [SPLIT_K, M, N]
    # sizes
    N,
    K,
    # strides (elements)
    stride_xm,
    stride_xk,
    stride_qn,  # bytes
    stride_sn,
    stride_zn,
    stride_om,
    stride_on,
    stride_os,
    # meta
    GROUP_SIZE: tl.constexpr,
    HAS_ZEROS: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    SPLIT_K: tl.constexpr,
    EVEN_K: tl.constexpr,  # K % BLOCK_K == 0 for every config: no mask along K
    INTERPRET: tl.constexpr,  # Triton interpreter: one config, bf16 rounding done by hand
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """out[m, n] = sum_k x[m, k] * w[n, k]; grid (M, N/BLOCK_N, SPLIT_K).

    Rows on axis 0: it has no 65535 limit, and neighbouring programs share the weight tile."""
    row = tl.program_id(0).to(tl.int64)
    pid_n = tl.program_id(1)
    pid_k = tl.program_id(2)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)

    k_blocks = tl.cdiv(K, BLOCK_K)
    per_split = tl.cdiv(k_blocks, SPLIT_K)
    kb_start = pid_k * per_split
    kb_end = tl.minimum(kb_start + per_split, k_blocks)
    acc = gemv_row(
        x_ptr + row * stride_xm, stride_xk, qbytes_ptr, scales_ptr, zeros_ptr,
        offs_n, kb_start, kb_end, N, K, stride_qn, stride_sn, stride_zn,
        GROUP_SIZE=GROUP_SIZE, HAS_ZEROS=HAS_ZEROS, EVEN_K=EVEN_K, INTERPRET=INTERPRET,
        BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K,
    )  # fmt: skip

    mask_n = offs_n < N
    if SPLIT_K == 1:
        if HAS_BIAS:
            acc += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)
        out = out_ptr + row * stride_om + offs_n * stride_on
        tl.store(out, cast_rne(acc, out_ptr.dtype.element_ty, INTERPRET), mask=mask_n)
    else:
        out = out_ptr + pid_k * stride_os + row * stride_om + offs_n * stride_on
        tl.store(out, acc, mask=mask_n)


def w4a16_gemv(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor | None,
    *,
    group_size: int,
    bias: torch.Tensor | None = None,
    split_k: int | None = None,
) -> torch.Tensor:
    """x [M, K] @ W.T for checked, contiguous packed inputs; group_size is the resolved G.

    split_k=None picks it from the device's SM count; tests pass it to cover both paths.
    """
    m, k = x.shape
    n = qweight.shape[0]
    if split_k is None:
        tiles = triton.cdiv(n, NOMINAL_BLOCK_N) * size_hint(m)
        split_k = choose_split_k(tiles, triton.cdiv(k, NOMINAL_BLOCK_K), num_sms(x.device))
    if split_k == 1:
        out = torch.empty((m, n), device=x.device, dtype=x.dtype)
        stride_os = 0
    else:
        out = torch.empty((split_k, m, n), device=x.device, dtype=torch.float32)
        stride_os = out.stride(0)

    def grid(meta):
        return (m, triton.cdiv(n, meta["BLOCK_N"]), split_k)

    launch(
        w4a16_gemv_kernel,
        grid,
        dict(
            x_ptr=x,
            qbytes_ptr=qweight.view(torch.uint8),
            scales_ptr=scales,
            zeros_ptr=zeros,
            bias_ptr=bias,
            out_ptr=out,
            N=n,
            K=k,
            stride_xm=x.stride(0),
            stride_xk=x.stride(1),
            stride_qn=qweight.stride(0) * 4,
            stride_sn=scales.stride(0),
            stride_zn=0 if zeros is None else zeros.stride(0),
            stride_om=out.stride(-2),
            stride_on=out.stride(-1),
            stride_os=stride_os,
            GROUP_SIZE=group_size,
            HAS_ZEROS=zeros is not None,
            HAS_BIAS=bias is not None,
            SPLIT_K=split_k,
            EVEN_K=even_k(k),
            INTERPRET=interpreting(),
        ),
    )
    if split_k == 1:
        return out
    return splitk_reduce(out, bias=bias, dtype=x.dtype)
