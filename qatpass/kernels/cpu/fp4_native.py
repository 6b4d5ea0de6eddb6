"""CPU FP4 (NVFP4 / MXFP4) linears on qatpass's native kernel: the entry the FP4 ops call.

    y = fp4_native_linear(x2d, qweight, scales, global_scale, fmt)   # fp32 [M, N], or None

The kernel is the W4A16 one (`native.run_fp4`, `csrc/w4a16_cpu.c`): the canonical FP4 packed
format as is (int32 nibbles [N, K/8], E4M3 or E8M0 block scales, NVFP4's fp32 global scale), the
E2M1 codes decoded by a bf16 table permute, the block scales decoded from their bytes in the
kernel and applied per lane; bf16 x with M >= `gemm.GEMM_MIN_M` rows takes the GEMM on decoded
strips. So y == x @ dequantize(p, float32).T up to fp32 summation order, at any thread count.
Returns None where it does not apply (`fp4_kernel_reason`: not a CPU with AVX-512 BW/BF16, no
compiler, `QATPASS_CPU_KERNEL=0`, x not float32/bfloat16): the caller dequantizes.
"""

from __future__ import annotations

import torch

from qatpass.kernels.cpu.gemm import use_gemm
from qatpass.kernels.cpu.native import NATIVE_DTYPES, _load, run_fp4

__all__ = ["fp4_kernel_reason", "fp4_native_linear"]


def fp4_kernel_reason(dtype: torch.dtype) -> str | None:
    """Why the FP4 kernel does not run for `dtype` activations on this machine (None: it does)."""
    if dtype not in NATIVE_DTYPES:
        return f"activations {dtype} (the kernel takes float32 or bfloat16)"
    return _load()[1]


def fp4_native_linear(
    x2d: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    global_scale: torch.Tensor | None,
    fmt: str,
) -> torch.Tensor | None:
    """fp32 x2d [M, K] @ W.T for an FP4 weight (validated by the caller, `ops._fp4_packed`, and
    again before the C code, `native.check_fp4_args`), or None where the kernel does not apply."""
    if x2d.device.type != "cpu" or fp4_kernel_reason(x2d.dtype) is not None:
        return None
    return run_fp4(_load()[0], x2d, qweight, scales, global_scale, fmt, gemm=use_gemm(x2d))
