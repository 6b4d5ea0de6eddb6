"""W4A16 for large M: dequantize the weight to x.dtype once, then torch's matmul (cuBLAS).

Above `plan.DEQUANT_MATMUL_MIN_M` rows the GEMM is compute-bound and the extra traffic of a
materialised weight (0.5 byte read + 2 bytes written and read again per weight) is small next
to the matmul, which cuBLAS runs at the tensor cores' rate. The dequant kernel computes each
weight exactly as `qatpass.dequantize(p, dtype=x.dtype)` does ((code - zero) * scale in fp32,
one round-to-nearest-even cast), so the result is the reference's matmul up to cuBLAS's fp32
summation order. The weight buffer is transient (N x K in x.dtype).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from qatpass.kernels.triton.common import MAGIC_BITS, MAGIC_OFFSET, cast_rne, interpreting, launch
from qatpass.kernels.triton.plan import DequantPlan


@triton.jit
def w4a16_dequant_kernel(
    qbytes_ptr,  # uint8 [N, K/2]: qweight's bytes, nibble k % 2 of byte k // 2 (low = even k)
    scales_ptr,  # fp16/bf16/fp32 [N, K/G]
    zeros_ptr,  # int8 [N, K/G] or None
    out_ptr,  # [N, K] in the activations' dtype, contiguous
    N,
    K,
    stride_qn,  # bytes
    stride_sn,
    stride_zn,
    GROUP_SIZE: tl.constexpr,
    HAS_ZEROS: tl.constexpr,
    INTERPRET: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """out[n, k] = round((nibble - 8 - zero) * scale); grid (N / BLOCK_N, K / BLOCK_K)."""
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_b = tl.program_id(1) * (BLOCK_K // 2) + tl.arange(0, BLOCK_K // 2)
    offs_k = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    rows = offs_n.to(tl.int64)[:, None]
    mask_b = (offs_n[:, None] < N) & (offs_b[None, :] < K // 2)
    ptrs = qbytes_ptr + rows * stride_qn + offs_b[None, :]
    packed = tl.load(ptrs, mask=mask_b, other=0, eviction_policy="evict_first").to(tl.int32)
    nibbles = tl.join((packed & 0xF) | MAGIC_BITS, (packed >> 4) | MAGIC_BITS)
    biased = tl.reshape(nibbles, (BLOCK_N, BLOCK_K)).to(tl.float32, bitcast=True)
    mask = (offs_n[:, None] < N) & (offs_k[None, :] < K)
    if GROUP_SIZE % BLOCK_K == 0:  # the tile lies in one group: one scale (and zero) per row
        group = (tl.program_id(1) * BLOCK_K) // GROUP_SIZE
        mask_g = offs_n[:, None] < N
    else:  # gathered per weight
        group = offs_k[None, :] // GROUP_SIZE
        mask_g = mask
    scales = tl.load(scales_ptr + rows * stride_sn + group, mask=mask_g, other=0.0)
    offset = MAGIC_OFFSET
    if HAS_ZEROS:
        zeros = tl.load(zeros_ptr + rows * stride_zn + group, mask=mask_g, other=0)
        offset = MAGIC_OFFSET + zeros.to(tl.float32)
    w = (biased - offset) * scales.to(tl.float32)
    out = out_ptr + rows * K + offs_k[None, :]
    tl.store(out, cast_rne(w, out_ptr.dtype.element_ty, INTERPRET), mask=mask)


def dequantize_weight(
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor | None,
    *,
    group_size: int,
    dtype: torch.dtype,
    plan: DequantPlan,
) -> torch.Tensor:
    """The [N, K] weight in `dtype`, equal to qatpass.dequantize of the packed weight."""
    n, k = qweight.shape[0], qweight.shape[1] * 8
    out = torch.empty((n, k), device=qweight.device, dtype=dtype)
    launch(
        w4a16_dequant_kernel,
        (-(-n // plan.block_n), -(-k // plan.block_k)),
        dict(
            qbytes_ptr=qweight.view(torch.uint8),
            scales_ptr=scales,
            zeros_ptr=zeros,
            out_ptr=out,
            N=n,
            K=k,
            stride_qn=qweight.stride(0) * 4,
            stride_sn=scales.stride(0),
            stride_zn=0 if zeros is None else zeros.stride(0),
            GROUP_SIZE=group_size,
            HAS_ZEROS=zeros is not None,
            INTERPRET=interpreting(),
            BLOCK_N=plan.block_n,
            BLOCK_K=plan.block_k,
            num_warps=4,
        ),
    )
    return out


def w4a16_dequant_matmul(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor | None,
    *,
    group_size: int,
    bias: torch.Tensor | None = None,
    plan: DequantPlan,
) -> torch.Tensor:
    """x [M, K] @ W.T (+ bias) for checked, contiguous packed inputs, through cuBLAS."""
    w = dequantize_weight(qweight, scales, zeros, group_size=group_size, dtype=x.dtype, plan=plan)
    if bias is None:
        return torch.matmul(x, w.T)
    return torch.addmm(bias.to(x.dtype), x, w.T)
