"""Triton FP4 (NVFP4, MXFP4) linear: codes decoded in registers right after the load.

    y = fp4_matmul(x2d, qweight, scales, global_scale, fmt="nvfp4")   # fp32 [M, N]

Inputs are the canonical FP4 format of `qatpass.scheme_fp4`: qweight int32 [N, K/8] (E2M1 codes,
low nibble first), scales [N, K/B] (NVFP4 float8_e4m3fn, B = 16; MXFP4 uint8 E8M0, B = 32), the
NVFP4 fp32 global scale. The kernel decodes each code and each scale byte with exact integer and
power-of-two arithmetic and multiplies them in fp32 (the element scale `e4m3 / global_scale` is
an IEEE division, `div_rn`), which is the scheme's fp32 dequantized weight, then accumulates
x @ W.T in fp32 with `tl.dot(..., input_precision="ieee")`: the result equals
x @ dequantize(p, float32).T up to summation order. One simple tiled kernel (no split-K, no
autotuning): a correct GPU path in the shape of the INT4 ones, not a tuned one. On CPU tensors it
runs under TRITON_INTERPRET=1 (set before triton is imported).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from qatpass.kernels.triton.common import launch

__all__ = ["fp4_matmul"]

_FMT = {"nvfp4": 0, "mxfp4": 1}


@triton.jit
def _pow2(e):
    """2**e in fp32 for int32 e in [-127, 127], from the bits (2**-127 is subnormal)."""
    normal = ((e + 127).to(tl.int32) << 23).to(tl.float32, bitcast=True)
    return tl.where(e >= -126, normal, 5.877471754111438e-39)


@triton.jit
def _fp4_kernel(
    # pointers
    x_ptr, qweight_ptr, scales_ptr, y_ptr,
    # sizes and strides
    M, N, K, stride_xm, stride_qn, stride_sn,
    global_scale,
    # meta
    FMT: tl.constexpr, BLOCK: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(
            x_ptr + rm[:, None] * stride_xm + rk[None, :],
            mask=(rm[:, None] < M) & (rk[None, :] < K),
            other=0.0,
        ).to(tl.float32)
        wmask = (rn[:, None] < N) & (rk[None, :] < K)
        words = tl.load(qweight_ptr + rn[:, None] * stride_qn + rk[None, :] // 8, mask=wmask)
        code = (words >> ((rk[None, :] % 8) * 4)) & 0xF
        # E2M1: exponent e = index >> 1, mantissa bit; e == 0 is subnormal (0 or 0.5)
        index = code & 7
        e = index >> 1
        mbit = (index & 1).to(tl.float32)
        mag = tl.where(e == 0, 0.5 * mbit, (2.0 + mbit) * _pow2(e - 2))
        value = tl.where((code & 8) != 0, -mag, mag)
        sbyte = tl.load(scales_ptr + rn[:, None] * stride_sn + rk[None, :] // BLOCK, mask=wmask)
        sbyte = sbyte.to(tl.int32) & 0xFF
        if FMT == 0:  # E4M3: (8 + m) * 2**(e - 10), subnormal m * 2**-9
            se = (sbyte >> 3) & 0xF
            sm = (sbyte & 7).to(tl.float32)
            s = tl.where(se == 0, sm * 0.001953125, (8.0 + sm) * _pow2(se - 10))
            s = tl.div_rn(s, tl.zeros_like(s) + global_scale)
        else:  # E8M0
            s = _pow2(sbyte - 127)
        w = tl.where(wmask, value * s, 0.0)
        acc += tl.dot(x, tl.trans(w), input_precision="ieee")
    tl.store(y_ptr + rm[:, None] * N + rn[None, :], acc, mask=(rm[:, None] < M) & (rn[None, :] < N))


def fp4_matmul(
    x2d: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    global_scale: torch.Tensor | None,
    fmt: str,
) -> torch.Tensor:
    """fp32 x2d [M, K] @ W.T for an FP4 weight (validated by the caller: `ops._fp4_packed`)."""
    m, k = x2d.shape
    n = qweight.shape[0]
    block = 16 if fmt == "nvfp4" else 32
    x2d = x2d.contiguous()
    qweight = qweight.contiguous()
    scales = scales.contiguous().view(torch.uint8)
    gs = 1.0 if global_scale is None else float(global_scale)
    y = torch.empty((m, n), dtype=torch.float32, device=x2d.device)
    bm, bn, bk = 16, 32, 32
    grid = (triton.cdiv(m, bm), triton.cdiv(n, bn))
    launch(_fp4_kernel, grid, dict(
        x_ptr=x2d, qweight_ptr=qweight, scales_ptr=scales, y_ptr=y,
        M=m, N=n, K=k, stride_xm=x2d.stride(0), stride_qn=qweight.stride(0),
        stride_sn=scales.stride(0), global_scale=gs,
        FMT=_FMT[fmt], BLOCK=block, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk,
    ))  # fmt: skip
    return y
