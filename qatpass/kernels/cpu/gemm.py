"""Larger M on CPU: the native GEMM on decoded weight strips (`qp_w4a16_gemm_bf16`).

    y = gemm_linear(lib, x2d, qweight, scales, zeros, bias, group_size)   # x2d bf16 [M, K]

From GEMM_MIN_M rows of bf16 x (prefill, batched decode) the work is the multiply-adds, not the
weight stream. The C kernel decodes each tile of the weight once per call (16 rows x 128 k: the
exact small integers code - zero in bf16, and the rows' scales) into a buffer that stays in L1,
and a register-blocked vdpbf16ps microkernel (6 rows of x x 32 weight rows) runs every row of x
over it, applying each group's scale to its fp32 partial sum with one fma. So the result is
x @ W.T with W the scheme's fp32 dequantize, as the native kernel computes it, up to fp32
summation order, and bit-identical at any thread count. Below GEMM_MIN_M the native kernel
(`native.run_native`) runs: its per-tile decode costs less than a whole decode when x has few
rows. `kernels.cpu.linear` picks per call from M (`use_gemm`), never at trace time; so does
`fp4_native.fp4_native_linear` for FP4 weights (the same kernel with the E2M1 table and the
scales decoded from their bytes).
"""

from __future__ import annotations

import ctypes
import functools

import torch

from qatpass.kernels.cpu.native import _load, run_native

__all__ = ["GEMM_MIN_M", "gemm_linear", "gemm_supported", "use_gemm"]

# Rows of bf16 x from which `kernels.cpu.linear` takes the GEMM (None: never). Measured on the
# 2-core dev machine (benchmarks/linear.py): see the README's CPU table.
GEMM_MIN_M: int | None = 32


def use_gemm(x2d: torch.Tensor) -> bool:
    """Whether a native-path call takes the GEMM (bf16 activations, M >= GEMM_MIN_M, a CPU with
    AVX-512 VBMI)."""
    return (
        GEMM_MIN_M is not None
        and x2d.dtype == torch.bfloat16
        and x2d.shape[0] >= GEMM_MIN_M
        and gemm_supported()
    )


@functools.cache
def gemm_supported() -> bool:
    """Whether this CPU runs the GEMM (its decode needs AVX-512 VBMI beside the native kernel's
    AVX-512 BW/BF16)."""
    lib = _load()[0]  # the machine's answer, also inside `native.disabled()`
    return lib is not None and bool(lib.qp_gemm_supported())


def gemm_linear(
    lib: ctypes.CDLL,
    x2d: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor | None,
    bias: torch.Tensor | None,
    group_size: int,
) -> torch.Tensor:
    """x2d bf16 [M, K] @ W.T (+ bias) -> bf16 [M, N] on decoded strips (see the module doc)."""
    if x2d.dtype != torch.bfloat16:
        raise ValueError(f"gemm_linear: x must be bfloat16, got {x2d.dtype}")
    if not lib.qp_gemm_supported():
        raise RuntimeError("gemm_linear: this CPU lacks AVX-512 VBMI")
    return run_native(lib, x2d, qweight, scales, zeros, bias, group_size, gemm=True)
