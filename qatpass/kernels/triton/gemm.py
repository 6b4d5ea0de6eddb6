"""W4A16 tiled GEMM (M >= 2, prefill and small batches): tensor-core `tl.dot`, optional split-K.

Each program computes a [BLOCK_M, BLOCK_N] output tile and dequantizes its weight tile in
registers per K step (fp32 (code - zero) * scale, cast to the activation dtype: the rounding of
`qatpass.dequantize(p, dtype=x.dtype)`), then feeds the tensor cores with fp32 accumulation.
Two operand orders (`plan.plan_gemm` picks by the real M):

- SWAP (M <= plan.GEMM_SWAP_MAX_M): the dot is w [BLOCK_N, BLOCK_K] @ x.T [BLOCK_K, BLOCK_M],
  out.T per program: the weight rows are the wide side (Hopper's wgmma takes the A operand,
  the dequantized weight, straight from registers, M 64 a warpgroup) and x's few rows the
  narrow N. The tile is read row by row (`load_dequant_rows`), and BLOCK_K may span several
  groups (one scale per row and group, broadcast by a reshape).
- Otherwise x [BLOCK_M, BLOCK_K] @ w.T [BLOCK_K, BLOCK_N] (`load_dequant`, BLOCK_K inside one
  group).

Every product is of the same rounded weight and x, exact in fp32, whichever operand order:
only the fp32 summation order differs. DOT_FP32 upcasts both operands to fp32 instead: the
Triton interpreter computes bf16 dots wrongly, and fp32 activations must not drop to TF32.
Tile, warps, stages and split-K come from `plan.plan_gemm` on the real M (no autotuning, so
nothing is benchmarked inside a CUDA-graph capture).
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
    load_dequant_rows,
    num_sms,
    use_fp32_dot,
)
from qatpass.kernels.triton.plan import GemmPlan, plan_gemm
from qatpass.kernels.triton.splitk_reduce import splitk_output, splitk_reduce


@triton.jit
def w4a16_gemm_kernel(
    # tensors
    x_ptr,  # fp16/bf16/fp32 [M, K]
    qbytes_ptr,  # uint8 [N, K/2]: qweight's bytes, nibble k % 2 of byte k // 2 (low = even k)
    scales_ptr,  # fp16/bf16/fp32 [N, K/G]
    zeros_ptr,  # int8 [N, K/G] signed zero-point codes, or None
    bias_ptr,  # [N] or None (added in the reduce kernel when SPLIT_K > 1)
    out_ptr,  # x.dtype [M, N] when SPLIT_K == 1, else fp32 partials [SPLIT_K, M, N]
    # sizes
    M,
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
    EVEN_K: tl.constexpr,  # K % BLOCK_K == 0: no mask along K
    DOT_FP32: tl.constexpr,
    INTERPRET: tl.constexpr,  # Triton interpreter: one config, bf16 rounding done by hand
    SWAP: tl.constexpr,  # weight rows as the dot's M (small M: plan.GemmPlan.swap)
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """out = x @ w.T tile by tile; grid (M/BLOCK_M, N/BLOCK_N, SPLIT_K), M fastest so that
    programs running together share (L2-resident) weight tiles."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_k = tl.program_id(2)
    offs_m = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M

    k_blocks = tl.cdiv(K, BLOCK_K)
    per_split = tl.cdiv(k_blocks, SPLIT_K)
    kb_start = pid_k * per_split
    kb_end = tl.minimum(kb_start + per_split, k_blocks)

    if SWAP:
        acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for kb in range(kb_start, kb_end):
        k0 = kb * BLOCK_K
        offs_k = k0 + tl.arange(0, BLOCK_K)
        x_tile = tl.load(
            x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk,
            mask=mask_m[:, None] if EVEN_K else mask_m[:, None] & (offs_k[None, :] < K),
            other=0.0,
        )
        if SWAP:
            # Small M: the weight rows are the dot's wide side (its M, the tensor cores' A
            # operand, dequantised in registers), x's rows its narrow N: acc is out.T.
            w = load_dequant_rows(
                qbytes_ptr, scales_ptr, zeros_ptr, offs_n, k0, N, K, stride_qn, stride_sn,
                stride_zn, GROUP_SIZE=GROUP_SIZE, HAS_ZEROS=HAS_ZEROS, EVEN_K=EVEN_K,
                BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K,
            )  # fmt: skip
        else:
            w = load_dequant(
                qbytes_ptr, scales_ptr, zeros_ptr, offs_n, k0, N, K, stride_qn, stride_sn,
                stride_zn, GROUP_SIZE=GROUP_SIZE, HAS_ZEROS=HAS_ZEROS, EVEN_K=EVEN_K,
                BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K,
            )  # fmt: skip
        # Round to the activation dtype exactly as dequantize(p, dtype=x.dtype) does.
        w = cast_rne(w, x_ptr.dtype.element_ty, INTERPRET)
        if SWAP:
            acc = dot_acc(w, tl.trans(x_tile), acc, DOT_FP32)
        else:
            acc = dot_acc(x_tile, w, acc, DOT_FP32)
    if SWAP:
        acc = tl.trans(acc)

    mask = mask_m[:, None] & (offs_n[None, :] < N)
    if SPLIT_K == 1:
        if HAS_BIAS:
            acc += tl.load(bias_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]
        out = out_ptr + offs_m[:, None] * stride_om + offs_n[None, :] * stride_on
        tl.store(out, cast_rne(acc, out_ptr.dtype.element_ty, INTERPRET), mask=mask)
    else:
        out = (
            out_ptr + pid_k * stride_os + offs_m[:, None] * stride_om + offs_n[None, :] * stride_on
        )
        tl.store(out, acc, mask=mask)


def w4a16_gemm(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor | None,
    *,
    group_size: int,
    bias: torch.Tensor | None = None,
    split_k: int | None = None,
    plan: GemmPlan | None = None,
) -> torch.Tensor:
    """x [M, K] @ W.T for checked, contiguous packed inputs; group_size is the resolved G.

    `plan` defaults to `plan_gemm` for these shapes on x's device (the real M, at run time),
    with `split_k` forced when given (tests cover both paths)."""
    m, k = x.shape
    n = qweight.shape[0]
    if plan is None:
        plan = plan_gemm(m, n, k, group_size, num_sms(x.device), split_k)
    split_k = plan.split_k
    out, stride_os = splitk_output(x, m, n, split_k)
    launch(
        w4a16_gemm_kernel,
        plan.grid,
        dict(
            x_ptr=x,
            qbytes_ptr=qweight.view(torch.uint8),
            scales_ptr=scales,
            zeros_ptr=zeros,
            bias_ptr=bias,
            out_ptr=out,
            M=m,
            N=n,
            K=k,
            stride_xm=x.stride(0),
            stride_xk=x.stride(1),
            stride_qn=qweight.stride(0) * 4,
            stride_sn=scales.stride(0),
            stride_zn=0 if zeros is None else zeros.stride(0),
            stride_om=n,
            stride_on=1,
            stride_os=stride_os,
            GROUP_SIZE=group_size,
            HAS_ZEROS=zeros is not None,
            HAS_BIAS=bias is not None,
            SPLIT_K=split_k,
            EVEN_K=k % plan.block_k == 0,
            DOT_FP32=use_fp32_dot(x),
            INTERPRET=interpreting(),
            SWAP=plan.swap,
            BLOCK_M=plan.block_m,
            BLOCK_N=plan.block_n,
            BLOCK_K=plan.block_k,
            num_warps=plan.num_warps,
            num_stages=plan.num_stages,
        ),
    )
    if split_k == 1:
        return out
    return splitk_reduce(out, bias=bias, dtype=x.dtype)
