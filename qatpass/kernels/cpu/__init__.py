"""CPU W4A16: one entry per op, on the canonical packed format only.

    y = kernels.cpu.linear(x2d, qweight, scales, zeros, bias, group_size=g)          # [M, N]
    y = kernels.cpu.grouped_linear(x, qweight, scales, zeros, bias, expert_ids, group_size=g)

`cpu_path` says, from shapes and dtypes alone (never values), which path a packed weight takes
for an activation dtype: qatpass's native kernel (`native`), aten's int4 GEMM on a repack
(`int4pack`, e.g. fp16 activations), or the scheme's dequantize + F.linear (`dequant`). Within
`native`, each call picks by M: bf16 x with M >= `gemm.GEMM_MIN_M` rows runs the GEMM on decoded
weight strips (`gemm.py`: the weight decoded once per call, a register-blocked microkernel over
all rows of x), fewer rows the native kernel (a decode per tile of x). The
aten repack is this package's concern: it is built on first use and cached beside the
canonical qweight (keyed on the tensor and its version counter), so an in-place refresh of the
canonical buffers invalidates it and nothing else ever holds or passes it.
"""

from __future__ import annotations

import functools

import torch

from qatpass.kernels.cpu.gemm import gemm_linear, use_gemm
from qatpass.kernels.cpu.int4pack import (
    CPU_PATH_NAMES,
    cached_repack,
    cpu_pack_reason,
    dequant_linear,
    int4pack_linear,
)
from qatpass.kernels.cpu.native import disabled_depth, library, native_reason, run_native
from qatpass.packed_args import check_grouped_args, check_packed_args

__all__ = ["CPU_PATH_NAMES", "cpu_path", "grouped_linear", "linear"]


def cpu_path(
    n: int,
    k: int,
    group_size: int,
    symmetric: bool,
    scale_dtype: torch.dtype,
    dtype: torch.dtype,
) -> tuple[str, str | None]:
    """(path, why no fast path or None) for an [n, k] packed weight and `dtype` activations.

    group_size is the effective group (k when per channel).
    """
    native = native_reason(dtype, scale_dtype, k, group_size)
    if native is None:
        return "native", None
    aten = cpu_pack_reason(n, group_size, symmetric, scale_dtype, dtype)
    if aten is None:
        return "int4pack", None
    return "dequant", f"native kernel: {native}; aten int4: {aten}"


def linear(
    x2d: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor | None,
    bias: torch.Tensor | None,
    *,
    group_size: int,
) -> torch.Tensor:
    """x2d [M, K] @ W.T (+ bias) on canonical arguments; group_size is effective (or -1).

    Validated here too (`check_packed_args`: it is public), and the native paths check the
    buffers the C code reads once more (`native.check_native_args`)."""
    if not isinstance(x2d, torch.Tensor) or x2d.dim() != 2:
        raise ValueError(f"kernels.cpu.linear: x must be a 2-d tensor [M, K], got {_shape(x2d)}")
    _, _, group_size = check_packed_args(
        x2d, qweight, scales, zeros, bias, group_size, experts=False
    )
    path = _path(x2d, qweight, scales, zeros, group_size)
    repack = _repack(path, qweight, scales, group_size, x2d.dtype)
    return _run(path, repack, x2d, qweight, scales, zeros, bias, group_size)


def _shape(t) -> object:
    return tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__


def _path(x, qweight, scales, zeros, group_size: int) -> str:
    n, k = qweight.shape[-2], qweight.shape[-1] * 8
    return _cached_path(n, k, group_size, zeros is None, scales.dtype, x.dtype, disabled_depth())


@functools.lru_cache(maxsize=1024)
def _cached_path(n, k, group_size, symmetric, scale_dtype, dtype, depth: int) -> str:
    """`cpu_path` per call shape (the machine's answer and `disabled()` depth are in the key)."""
    return cpu_path(n, k, group_size, symmetric, scale_dtype, dtype)[0]


def _repack(path: str, qweight, scales, group_size: int, dtype: torch.dtype):
    if path != "int4pack":
        return None
    return cached_repack(qweight, scales, group_size=group_size, dtype=dtype)


def _run(path, repack, x2d, qweight, scales, zeros, bias, group_size: int) -> torch.Tensor:
    if path == "native":
        lib = library()
        if use_gemm(x2d):
            return gemm_linear(lib, x2d, qweight, scales, zeros, bias, group_size)
        return run_native(lib, x2d, qweight, scales, zeros, bias, group_size)
    if repack is not None:
        return int4pack_linear(x2d, repack[0], repack[1], bias)
    return dequant_linear(x2d, qweight, scales, zeros, bias, group_size=group_size)


def grouped_linear(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor | None,
    bias: torch.Tensor | None,
    expert_ids: torch.Tensor,
    *,
    group_size: int,
) -> torch.Tensor:
    """Row t of x [T, K] times expert expert_ids[t]: one matmul per expert present (validated
    here, `check_grouped_args`, and the expert ids' range below)."""
    n, _, group_size = check_grouped_args(x, qweight, scales, zeros, bias, expert_ids, group_size)
    out = torch.zeros((x.shape[0], n), dtype=x.dtype, device=x.device)
    if x.shape[0] == 0:
        return out
    num_experts = qweight.shape[0]
    lo, hi = int(expert_ids.min()), int(expert_ids.max())
    if lo < 0 or hi >= num_experts:
        raise ValueError(
            f"w4a16_grouped_linear: expert_ids must lie in [0, {num_experts}), got [{lo}, {hi}]"
        )
    path = _path(x, qweight, scales, zeros, group_size)
    repack = _repack(path, qweight, scales, group_size, x.dtype)
    ids, order = torch.sort(expert_ids)
    counts = torch.bincount(ids, minlength=num_experts).tolist()
    start = 0
    for e, count in enumerate(counts):
        if count == 0:
            continue
        rows = order[start : start + count]
        start += count
        ye = _run(
            path,
            None if repack is None else (repack[0][e], repack[1][e]),
            x.index_select(0, rows),
            qweight[e],
            scales[e],
            None if zeros is None else zeros[e],
            None if bias is None else bias[e],
            group_size,
        )
        out.index_copy_(0, rows, ye)
    return out
