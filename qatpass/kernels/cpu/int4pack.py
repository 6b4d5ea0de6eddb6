"""CPU W4A16 beside the native kernel: aten's int4 GEMM on a cached repack, and the fallback.

The paths (`kernels.cpu.cpu_path` picks one from shapes and dtypes):
- "native": qatpass's own kernel (`native.py`) on the canonical buffers, no repack; first
  choice wherever it applies (bf16/fp32 activations, AVX-512 BF16 CPU, symmetric or not);
- "int4pack": aten's int4 GEMM on a repack (below, `cached_repack`), e.g. fp16 activations;
- "dequant": the scheme's dequantize, then F.linear, per call.

aten path: `aten._weight_int4pack_mm_for_cpu(x, w, kernel_group, scales_and_zeros)` computes
x @ W.T with W[n, k] = (u - 8) * scale + zero, u the stored nibble, in fp32 inside the kernel.
Our nibble is code + 8, so with zero = 0 its weights are exactly the scheme's fp32 dequant
code * scale (not rounded to the activation dtype: the result differs from
`F.linear(x, dequantize(p, x.dtype))` only by that rounding and the summation order).

The repack (`pack_for_cpu`) runs once per weight and version (`cached_repack`), and needs (checked here):
- activations bf16 or fp16, and scales of the same dtype (scales_and_zeros must match x's
  dtype; storing scales in another 16-bit dtype could round them). fp32 activations run the
  kernel's scalar path (~4x slower than bf16 F.linear at M=1 here, 100x at M=64): fallback;
- symmetric: the zero offset -zero * scale is rarely representable in bf16/fp16, so an
  asymmetric weight would not be exact: fallback;
- N % 16 == 0 (the repack's requirement);
- a kernel group size in {32, 64, 128, 256} dividing the scheme's group: larger groups (and
  per-channel with such a K) repeat their scale over kernel groups, which is exact. Groups of
  8 or 16 fall back.
The rules depend on shapes and dtypes only, never on values, so a refresh of the weights keeps
the path. Everything else runs `dequant_linear`: the scheme's dequantize, then F.linear.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.weak import WeakIdKeyDictionary

from qatpass.scheme import CODE_OFFSET, Int4Scheme, PackedWeight, dequantize, unpack_int4

__all__ = [
    "CPU_PATH_NAMES",
    "cached_repack",
    "KERNEL_GROUP_SIZES",
    "CPU_ACTIVATION_DTYPES",
    "cpu_pack_reason",
    "kernel_group_size",
    "pack_for_cpu",
    "int4pack_linear",
    "dequant_linear",
    "dequant_weight",
]

KERNEL_GROUP_SIZES = (256, 128, 64, 32)
CPU_ACTIVATION_DTYPES = (torch.bfloat16, torch.float16)
_KERNEL_OFFSET = 8  # the aten kernel computes (u - 8) * scale + zero
assert CODE_OFFSET == _KERNEL_OFFSET, "stored nibbles must be code + 8 for the aten int4 kernel"


def kernel_group_size(group_size: int) -> int | None:
    """The aten kernel group size for a scheme group (K itself when per channel), if any."""
    for g in KERNEL_GROUP_SIZES:
        if group_size % g == 0:
            return g
    return None


def cpu_pack_reason(
    n: int, group_size: int, symmetric: bool, scale_dtype: torch.dtype, dtype: torch.dtype
) -> str | None:
    """Why an [n, k] weight cannot take the CPU fast path for `dtype` activations, or None.

    group_size is the effective group (K when per channel).
    """
    if dtype not in CPU_ACTIVATION_DTYPES:
        return f"activation dtype {dtype} (the fast path takes bfloat16/float16)"
    if scale_dtype != dtype:
        return f"scale dtype {scale_dtype} differs from the activation dtype {dtype}"
    if not symmetric:
        return "asymmetric (zero offsets are not exact in 16-bit)"
    if n % 16:
        return f"out_features {n} is not a multiple of 16"
    if kernel_group_size(group_size) is None:
        return f"group size {group_size} is not a multiple of 32"
    return None


def _scales_and_zeros(scales: torch.Tensor, group_size: int, dtype: torch.dtype) -> torch.Tensor:
    """[N, K/G] scales -> the kernel's [K/g, N, 2] (scale, zero = 0) in dtype."""
    g = kernel_group_size(group_size)
    s = scales.repeat_interleave(group_size // g, dim=-1).to(dtype)
    return torch.stack((s, torch.zeros_like(s)), dim=-1).transpose(-3, -2).contiguous()


CPU_PATH_NAMES = {
    "native": "qatpass native kernel (CPU)",
    "int4pack": "aten int4pack (CPU)",
    "dequant": "dequantize + F.linear (CPU)",
}


def _nibbles(qweight: torch.Tensor) -> torch.Tensor:
    return unpack_int4(qweight).to(torch.int32) + CODE_OFFSET  # [..., N, K] in 0..15


def pack_for_cpu(
    qweight: torch.Tensor, scales: torch.Tensor, *, group_size: int, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """Repack canonical int32 [(E,) N, K/8] + scales [(E,) N, K/G] for the aten CPU kernel.

    Returns (cpu_packed uint8 [(E,) N, K/2], cpu_scales_zeros dtype [(E,) K/g, N, 2]). The caller
    has checked `cpu_pack_reason` (symmetric, shapes, dtypes).
    """
    nibbles = _nibbles(qweight.detach().cpu())
    convert = torch.ops.aten._convert_weight_to_int4pack_for_cpu
    if nibbles.dim() == 2:
        packed = convert(nibbles, 2)
    else:
        packed = torch.stack([convert(w, 2) for w in nibbles])
    return packed, _scales_and_zeros(scales.detach().cpu(), group_size, dtype)


_REPACKS = WeakIdKeyDictionary()


def _version(t: torch.Tensor) -> int | None:
    try:
        return t._version
    except RuntimeError:  # an inference tensor keeps no version counter: cannot see a refresh
        return None


def cached_repack(
    qweight: torch.Tensor, scales: torch.Tensor, *, group_size: int, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The aten repack of (qweight, scales) for `dtype`, built once and cached beside qweight.

    Rebuilt when either tensor was written in place since (their version counters moved), so
    `refresh` needs to know nothing about it. None for tensors that keep no version counter
    (created under inference_mode): the caller takes the exact fallback.
    """
    versions = (_version(qweight), _version(scales))
    if None in versions or type(qweight) is not torch.Tensor:
        return None
    entry = _REPACKS.get(qweight)
    key = (versions, id(scales), dtype, group_size)
    if entry is None or entry[0] != key:
        entry = (key, pack_for_cpu(qweight, scales, group_size=group_size, dtype=dtype))
        _REPACKS[qweight] = entry
    return entry[1]


def int4pack_linear(
    x2d: torch.Tensor,
    cpu_packed: torch.Tensor,
    cpu_scales_zeros: torch.Tensor,
    bias: torch.Tensor | None,
) -> torch.Tensor:
    """x2d [M, K] (dtype of cpu_scales_zeros) @ W.T (+ bias) with the aten int4 CPU kernel."""
    k = x2d.shape[-1]
    g = k // cpu_scales_zeros.shape[0]
    y = torch.ops.aten._weight_int4pack_mm_for_cpu(
        x2d.contiguous(), cpu_packed, g, cpu_scales_zeros
    )
    return y if bias is None else y + bias.to(y.dtype)


def dequant_weight(
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor | None,
    *,
    group_size: int,
    dtype: torch.dtype,
) -> torch.Tensor:
    """The [N, K] weight canonical buffers stand for, in `dtype` (the scheme's dequantize)."""
    n, k = qweight.shape[-2], qweight.shape[-1] * 8
    # dequantize reads only the group size from the scheme (codes, scales, zeros are given)
    # (one group spanning all of K is the scheme's per-channel -1, whatever K is)
    per_channel = group_size in (-1, k)
    scheme = Int4Scheme(group_size=-1 if per_channel else group_size, symmetric=zeros is None)
    packed = PackedWeight(qweight, scales, zeros, torch.Size((n, k)), 1, dtype, scheme)
    return dequantize(packed, dtype)


def dequant_linear(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor | None,
    bias: torch.Tensor | None,
    *,
    group_size: int,
) -> torch.Tensor:
    """The fallback: the scheme's dequantize to x's dtype, then F.linear (per call)."""
    w = dequant_weight(qweight, scales, zeros, group_size=group_size, dtype=x.dtype)
    return F.linear(x, w, None if bias is None else bias.to(x.dtype))
