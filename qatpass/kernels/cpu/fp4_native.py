"""qatpass's CPU FP4 kernel (AVX-512): NVFP4 / MXFP4 linears decoded in registers.

    y = fp4_native_linear(x2d, qweight, scales, global_scale, fmt)   # fp32 [M, N], or None

Reads the canonical FP4 packed format as is (`qatpass.scheme_fp4`: int32 nibbles [N, K/8],
E4M3 or E8M0 block scales, NVFP4's fp32 global scale): a 16-entry table in one register decodes
the codes (`vpermps`), times each block's fp32 element scale, which is the scheme's fp32
dequantized weight; fp32 accumulation. So y == x @ dequantize(p, float32).T up to summation
order. Source: `csrc/fp4_cpu.c`, built and verified by `build.py` like the INT4 kernel (its own
cache entry); `QATPASS_CPU_KERNEL=0` turns it off too. Returns None where it does not apply
(not x86-64 with AVX-512 BW, no compiler, x not float32/bfloat16): the caller dequantizes.
"""

from __future__ import annotations

import ctypes
import functools
import logging
from pathlib import Path

import torch

from qatpass.kernels.cpu.build import load_kernel

__all__ = ["fp4_kernel_reason", "fp4_native_linear"]

log = logging.getLogger(__name__)

_SOURCE = Path(__file__).with_name("csrc") / "fp4_cpu.c"
_FLAGS = ("-O3", "-shared", "-fPIC", "-fopenmp", "-mavx512f", "-mavx512bw", "-mavx512vl",
          "-mfma")  # fmt: skip
_FMT = {"nvfp4": 0, "mxfp4": 1}
_I64, _INT, _PTR, _F32 = ctypes.c_int64, ctypes.c_int, ctypes.c_void_p, ctypes.c_float


@functools.cache
def _load() -> tuple[ctypes.CDLL | None, str | None]:
    lib, why = load_kernel(_SOURCE, _FLAGS, "fp4_cpu", "FP4")
    if lib is None:
        return None, why
    if not lib.qp_fp4_supported():
        return None, "this CPU lacks AVX-512 BW"
    lib.qp_fp4_linear.argtypes = [_PTR, _I64, _PTR, _PTR, _F32, _INT, _PTR, _I64, _I64, _I64,
                                  _INT]  # fmt: skip
    lib.qp_fp4_linear.restype = _INT
    return lib, None


def fp4_kernel_reason(dtype: torch.dtype) -> str | None:
    """Why the FP4 kernel does not run for `dtype` activations on this machine (None: it does)."""
    if dtype not in (torch.float32, torch.bfloat16):
        return f"activations {dtype} (the kernel takes float32 or bfloat16)"
    return _load()[1]


def fp4_native_linear(
    x2d: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    global_scale: torch.Tensor | None,
    fmt: str,
) -> torch.Tensor | None:
    """fp32 x2d [M, K] @ W.T for an FP4 weight (validated by the caller: `ops._fp4_packed`)."""
    if x2d.device.type != "cpu" or fp4_kernel_reason(x2d.dtype) is not None:
        return None
    lib = _load()[0]
    m, k = x2d.shape
    n = qweight.shape[0]
    block = 16 if fmt == "nvfp4" else 32
    if qweight.shape != (n, k // 8) or scales.shape != (n, k // block) or k % block:
        raise ValueError(f"fp4 kernel: inconsistent shapes x {tuple(x2d.shape)}, "
                         f"qweight {tuple(qweight.shape)}, scales {tuple(scales.shape)}")  # fmt: skip
    x2d = x2d.to(torch.float32).contiguous()  # bf16 -> fp32 is exact
    qweight, scales = qweight.contiguous(), scales.contiguous()
    gs = 1.0 if global_scale is None else float(global_scale)
    y = torch.empty((m, n), dtype=torch.float32)
    if m == 0 or n == 0:
        return y
    lib.qp_fp4_linear(x2d.data_ptr(), x2d.stride(0), qweight.data_ptr(), scales.data_ptr(), gs, _FMT[fmt], y.data_ptr(),
                      m, n, k, torch.get_num_threads())  # fmt: skip
    return y
