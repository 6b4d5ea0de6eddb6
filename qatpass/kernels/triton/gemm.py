"""W4A16 tiled GEMM (M >= 2, prefill and small batches): tensor-core `tl.dot`, optional split-K.

Each program computes a [BLOCK_M, BLOCK_N] output tile. Per K step it loads the packed weight
tile as bytes [BLOCK_K/2, BLOCK_N] (the same memory as int32 qweight), splits and interleaves
the nibbles in registers, dequantizes (fp32 (code - zero) * scale), casts it to the activation
dtype (the rounding of `qatpass.dequantize(p, dtype=x.dtype)`) and feeds the tensor cores with
fp32 accumulation. DOT_FP32 upcasts both operands to fp32 instead: the
Triton interpreter computes bf16 dots wrongly, and fp32 activations must not drop to TF32.
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
    interpreting,
    launch,
    load_dequant,
    next_power_of_2,
    num_sms,
    size_hint,
    use_fp32_dot,
)
from qatpass.kernels.triton.splitk_reduce import splitk_reduce

NOMINAL_BLOCK_M = 64
NOMINAL_BLOCK_N = 64
NOMINAL_BLOCK_K = 128

GEMM_CONFIGS = [
    triton.Config({"BLOCK_M": 16, "BLOCK_N": 64, "BLOCK_K": 64}, num_warps=4, num_stages=4),
    triton.Config({"BLOCK_M": 16, "BLOCK_N": 64, "BLOCK_K": 128}, num_warps=4, num_stages=4),
    triton.Config({"BLOCK_M": 32, "BLOCK_N": 64, "BLOCK_K": 128}, num_warps=4, num_stages=4),
    triton.Config({"BLOCK_M": 16, "BLOCK_N": 128, "BLOCK_K": 128}, num_warps=4, num_stages=4),
    triton.Config({"BLOCK_M": 32, "BLOCK_N": 128, "BLOCK_K": 64}, num_warps=4, num_stages=4),
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 64}, num_warps=4, num_stages=4),
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 64}, num_warps=4, num_stages=4),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 256, "BLOCK_K": 64}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_M": 256, "BLOCK_N": 128, "BLOCK_K": 64}, num_warps=8, num_stages=3),
    # BLOCK_K = 32: one scale per column per step for group size 32.
    triton.Config({"BLOCK_M": 16, "BLOCK_N": 128, "BLOCK_K": 32}, num_warps=4, num_stages=4),
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 32}, num_warps=4, num_stages=4),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 32}, num_warps=8, num_stages=4),
]


def gemm_m_bucket(m: int) -> int:
    """Autotune key for M: powers of two up to 256, then one bucket (tiles stop growing)."""
    return min(next_power_of_2(m), 256)


def prune_gemm_configs(configs: list, named_args: dict, **kwargs) -> list:
    """Drop tiles taller than the M bucket or wider than N/K, prefer BLOCK_K within a group;
    one config under the interpreter."""
    args = {**named_args, **kwargs}
    m_cap = max(16, args["M_BUCKET"])
    n_cap = max(64, next_power_of_2(args["N"]))
    k_cap = max(64, next_power_of_2(args["K"]))

    def fits(c) -> bool:
        kw = c.kwargs
        return kw["BLOCK_M"] <= m_cap and kw["BLOCK_N"] <= n_cap and kw["BLOCK_K"] <= k_cap

    kept = fitting_configs(configs, fits, args["GROUP_SIZE"])
    if not args["INTERPRET"]:
        return kept
    # Interpreter: the biggest tile that fits runs the fewest (slow, Python-level) programs.
    return [max(kept, key=lambda c: c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"])]


@triton.autotune(
    configs=GEMM_CONFIGS,
    key=["M_BUCKET", "N", "K", "GROUP_SIZE", "SPLIT_K"],
    prune_configs_by={"early_config_prune": prune_gemm_configs},
)
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
    M_BUCKET,  # autotune key only
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
    DOT_FP32: tl.constexpr,
    INTERPRET: tl.constexpr,  # Triton interpreter: one config, bf16 rounding done by hand
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

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for kb in range(kb_start, kb_end):
        k0 = kb * BLOCK_K
        offs_k = k0 + tl.arange(0, BLOCK_K)
        w = load_dequant(
            qbytes_ptr, scales_ptr, zeros_ptr, offs_n, k0, N, K, stride_qn, stride_sn, stride_zn,
            GROUP_SIZE=GROUP_SIZE, HAS_ZEROS=HAS_ZEROS, EVEN_K=EVEN_K,
            BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K,
        )  # fmt: skip
        # Round to the activation dtype exactly as dequantize(p, dtype=x.dtype) does.
        w = cast_rne(w, x_ptr.dtype.element_ty, INTERPRET)
        x_tile = tl.load(
            x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk,
            mask=mask_m[:, None] if EVEN_K else mask_m[:, None] & (offs_k[None, :] < K),
            other=0.0,
        )
        if DOT_FP32:
            acc = tl.dot(x_tile.to(tl.float32), w.to(tl.float32), acc, input_precision="ieee")
        else:
            acc = tl.dot(x_tile, w, acc)

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
) -> torch.Tensor:
    """x [M, K] @ W.T for checked, contiguous packed inputs; group_size is the resolved G.

    split_k=None picks it from the device's SM count; tests pass it to cover both paths.
    """
    m, k = x.shape
    n = qweight.shape[0]
    if split_k is None:
        tiles = triton.cdiv(size_hint(m), NOMINAL_BLOCK_M) * triton.cdiv(n, NOMINAL_BLOCK_N)
        split_k = choose_split_k(tiles, triton.cdiv(k, NOMINAL_BLOCK_K), num_sms(x.device))
    if split_k == 1:
        out = torch.empty((m, n), device=x.device, dtype=x.dtype)
        stride_os = 0
    else:
        out = torch.empty((split_k, m, n), device=x.device, dtype=torch.float32)
        stride_os = out.stride(0)

    def grid(meta):
        return (triton.cdiv(m, meta["BLOCK_M"]), triton.cdiv(n, meta["BLOCK_N"]), split_k)

    launch(
        w4a16_gemm_kernel,
        grid,
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
            M_BUCKET=gemm_m_bucket(size_hint(m)),
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
            DOT_FP32=use_fp32_dot(x),
            INTERPRET=interpreting(),
        ),
    )
    if split_k == 1:
        return out
    return splitk_reduce(out, bias=bias, dtype=x.dtype)
