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
`kernels.cpu.linear` picks this per call from M (`use_gemm`), never at trace time; it is off by
default (GEMM_MIN_M = None, see there why).
"""

from __future__ import annotations

import ctypes

import torch
import torch.nn.functional as F

from qatpass.kernels.cpu.native import _SCALE_KIND, _weight_ptrs, _x_rows, check_native_args

__all__ = ["GEMM_MIN_M", "PANEL_BYTES", "gemm_linear", "use_gemm"]

# Rows of x from which `kernels.cpu.linear` takes this path; None: never (the default). Measured
# on the 2-core dev machine (loaded): at 1 thread it beats the native kernel from M = 64
# (0.93-0.95x bf16 against 0.7-0.8x), but at 2 threads every switch between the decode and
# oneDNN's parallel region cost up to tens of ms (2-7x slower than the native kernel), and the
# path may not depend on the thread count (results must stay bit-identical across threads).
GEMM_MIN_M: int | None = None
PANEL_BYTES = 8 << 20  # decoded weight per GEMM call (few calls: each switch between the decode
# and oneDNN costs, measured up to 15 ms at 2 threads on a loaded machine)
MIN_PANEL_ROWS = 256  # narrower panels make oneDNN slow (and each panel is a thread barrier)
_BLOCK = 128  # the kernel's k block


def use_gemm(x2d: torch.Tensor) -> bool:
    """Whether a native-path call takes the panel GEMM (bf16 activations, M >= GEMM_MIN_M)."""
    return GEMM_MIN_M is not None and x2d.dtype == torch.bfloat16 and x2d.shape[0] >= GEMM_MIN_M


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
    rows = min(n, max(MIN_PANEL_ROWS, PANEL_BYTES // (2 * padded) // 64 * 64))
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
