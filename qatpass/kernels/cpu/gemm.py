"""Large M on CPU: decode the packed weight panel by panel to bf16, then torch's bf16 GEMM.

    y = gemm_linear(lib, x2d, qweight, scales, zeros, bias, group_size)   # x2d bf16 [M, K]

At M >= GEMM_MIN_M (prefill, batched decode) the work is the multiply-adds, not the weight
stream, and oneDNN's bf16 GEMM does them faster than the native kernel's per-block decode can:
so each panel of PANEL_BYTES of weight rows is decoded once (`qp_decode_bf16`: RNE to bf16 of
the fp32 (code - zero) * scale, bit-equal to `dequantize(p, torch.bfloat16)`) into a buffer that
stays in the last-level cache, and `F.linear` runs on it. Both x and the panel are in the
kernel's arranged k order (a permutation of k within blocks of 128, zero padded), which changes
the summation order only. So the result is `F.linear(x, dequantize(p, bf16), bias)` up to fp32
summation order, the same as the dequant fallback, without materialising the whole weight.
`kernels.cpu.linear` picks this per call from M (`use_gemm`), never at trace time.
"""

from __future__ import annotations

import ctypes

import torch
import torch.nn.functional as F

from qatpass.kernels.cpu.native import _SCALE_KIND, _weight_ptrs, _x_rows, check_native_args

__all__ = ["GEMM_MIN_M", "PANEL_BYTES", "gemm_linear", "use_gemm"]

GEMM_MIN_M = 64  # rows of x from which decode-once + bf16 GEMM beats the native kernel here
PANEL_BYTES = 2 << 20  # decoded weight rows per GEMM call: stays in L3 between decode and GEMM
_BLOCK = 128  # the kernel's k block


def use_gemm(x2d: torch.Tensor) -> bool:
    """Whether a native-path call takes the panel GEMM (bf16 activations, M >= GEMM_MIN_M)."""
    return x2d.dtype == torch.bfloat16 and x2d.shape[0] >= GEMM_MIN_M


def gemm_linear(
    lib: ctypes.CDLL,
    x2d: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor | None,
    bias: torch.Tensor | None,
    group_size: int,
) -> torch.Tensor:
    """x2d bf16 [M, K] @ W.T (+ bias) -> bf16 [M, N] on decoded panels (see the module doc)."""
    m, n, k = check_native_args(x2d, qweight, scales, zeros, bias, group_size)
    if x2d.dtype != torch.bfloat16:
        raise ValueError(f"gemm_linear: x must be bfloat16, got {x2d.dtype}")
    qweight, scales, zeros, zeros_ptr = _weight_ptrs(qweight, scales, zeros)
    padded = -(-k // _BLOCK) * _BLOCK
    x = _x_rows(x2d)
    xa = torch.empty((m, padded), dtype=torch.bfloat16)
    if m:
        lib.qp_arrange_bf16(x.data_ptr(), x.stride(0), m, k, xa.data_ptr())
    b = None if bias is None else bias.detach().to(torch.bfloat16)
    rows = min(n, max(16, PANEL_BYTES // (2 * padded)))
    panel = torch.empty((rows, padded), dtype=torch.bfloat16)
    kind, threads = _SCALE_KIND[scales.dtype], torch.get_num_threads()
    y = None if rows >= n else torch.empty((m, n), dtype=torch.bfloat16)
    for n0 in range(0, n, rows):
        n1 = min(n, n0 + rows)
        lib.qp_decode_bf16(qweight.data_ptr(), scales.data_ptr(), kind, zeros_ptr, n0, n1, k,
                           group_size, panel.data_ptr(), padded, threads)  # fmt: skip
        part = F.linear(xa, panel[: n1 - n0], None if b is None else b[n0:n1])
        if y is None:
            return part
        y[:, n0:n1] = part
    return y
