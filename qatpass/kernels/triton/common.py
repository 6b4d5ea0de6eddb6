"""What every W4A16 Triton kernel shares: in-register dequant, input checks, launch choices.

`load_dequant` (byte tiles for tl.dot, the GEMM) and `gemv_row` (the grouped kernel's row loop)
turn packed nibbles into weights as `qatpass.scheme.dequantize_codes` does: w = (code - zero)
* scale in fp32, with code = nibble - 8 and the nibble of k at bits 4 * (k % 8) of int32 word
k // 8, i.e. bits 4 * (k % 2) of byte k // 2: both read qweight as its uint8 [N, K/2] view.
(The GEMV has its own word-wise dequant, gemv.py, which the swapped GEMM reuses for 16-bit
scales: gemm.load_dequant_packed.) `launch` and `capture_launches` are the one way kernels are
launched, and recorded for static analysis (benchmarks/sass_report.py).
"""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

from qatpass.packed_args import check_packed_args

# Stand-in SM count off GPU: small, so tests on tiny shapes still take the split-K path.
INTERPRETER_NUM_SMS = 4


# float32 with bits 0x4B000000 | n is exactly 2**23 + n for n < 2**23: OR-ing a nibble into it
# and subtracting 2**23 + 8 (+ zero) turns the nibble into its code in fp32 with no int->float
# conversion instruction (those run at a fraction of the FMA rate and would bound a GEMV).
MAGIC_BITS = tl.constexpr(0x4B000000)
MAGIC_OFFSET = tl.constexpr(8388616.0)  # 2**23 + 8: the float above minus the code offset 8


@triton.jit
def load_dequant(
    # packed weight as bytes (one matrix: the caller has already offset to its expert)
    qbytes_ptr,  # uint8 [N, K/2]: the bytes of int32 qweight [N, K/8]; low nibble = even k
    scales_ptr,  # float [N, K/G]
    zeros_ptr,  # int8 [N, K/G] or None
    # tile
    offs_n,  # [BLOCK_N] output columns
    k0,  # first k of the tile, a multiple of BLOCK_K
    # sizes and row strides (elements)
    N,
    K,
    stride_qn,  # bytes per row of qbytes
    stride_sn,
    stride_zn,
    # meta
    GROUP_SIZE: tl.constexpr,
    HAS_ZEROS: tl.constexpr,
    EVEN_K: tl.constexpr,  # K % BLOCK_K == 0: no mask along K
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """fp32 [BLOCK_K, BLOCK_N] tile of w.T, (code - zero) * scale; 0 outside [N, K].

    The tl.dot form: each byte is loaded once and split into its two nibbles, which
    join/permute/reshape interleave back into k order (k = 2 j + i for byte j, nibble i)
    in registers.
    """
    offs_b = k0 // 2 + tl.arange(0, BLOCK_K // 2)
    mask_n = offs_n < N
    mask = mask_n[None, :] if EVEN_K else mask_n[None, :] & (offs_b[:, None] < K // 2)
    # int64 row offsets: N * K / 2 bytes can pass 2**31 (large vocab heads).
    rows = offs_n.to(tl.int64)[None, :] * stride_qn
    ptrs = qbytes_ptr + rows + offs_b[:, None]
    packed = tl.load(ptrs, mask=mask, other=0, eviction_policy="evict_first").to(tl.int32)
    nibbles = tl.join((packed & 0xF) | MAGIC_BITS, (packed >> 4) | MAGIC_BITS)  # [BK/2, BN, 2]
    nibbles = tl.reshape(tl.permute(nibbles, (0, 2, 1)), (BLOCK_K, BLOCK_N))
    biased = nibbles.to(tl.float32, bitcast=True)
    if GROUP_SIZE % BLOCK_K == 0:
        # The whole tile lies in one group: one scale (and zero) per column.
        group = k0 // GROUP_SIZE
        scales = tl.load(scales_ptr + offs_n * stride_sn + group, mask=mask_n, other=0.0)
        scales = scales.to(tl.float32)[None, :]
        offset = MAGIC_OFFSET
        if HAS_ZEROS:
            zeros = tl.load(zeros_ptr + offs_n * stride_zn + group, mask=mask_n, other=0)
            offset = MAGIC_OFFSET + zeros.to(tl.float32)[None, :]
    else:
        offs_k = k0 + tl.arange(0, BLOCK_K)
        group = offs_k // GROUP_SIZE
        mask_g = mask_n[None, :] if EVEN_K else mask_n[None, :] & (offs_k[:, None] < K)
        scales = tl.load(
            scales_ptr + offs_n[None, :] * stride_sn + group[:, None], mask=mask_g, other=0.0
        ).to(tl.float32)
        offset = MAGIC_OFFSET
        if HAS_ZEROS:
            zeros = tl.load(
                zeros_ptr + offs_n[None, :] * stride_zn + group[:, None], mask=mask_g, other=0
            )
            offset = MAGIC_OFFSET + zeros.to(tl.float32)
    return (biased - offset) * scales


@triton.jit
def load_dequant_rows(
    qbytes_ptr,  # uint8 [N, K/2]: the bytes of int32 qweight [N, K/8]; low nibble = even k
    scales_ptr,  # float [N, K/G]
    zeros_ptr,  # int8 [N, K/G] or None
    offs_n,  # [BLOCK_N] weight rows
    k0,  # first k of the tile, a multiple of BLOCK_K
    N,
    K,
    stride_qn,  # bytes per row of qbytes
    stride_sn,
    stride_zn,
    GROUP_SIZE: tl.constexpr,
    HAS_ZEROS: tl.constexpr,
    EVEN_K: tl.constexpr,  # K % BLOCK_K == 0: no mask along K
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """fp32 [BLOCK_N, BLOCK_K] tile of w (rows of the weight, k contiguous), (code - zero) *
    scale; 0 outside [N, K]. The swapped GEMM's A operand: each row's bytes are one contiguous
    (vectorised) load, the nibbles interleave back along the last axis, and a tile spanning
    several groups reads one scale per (row, group), broadcast over the group by a reshape
    (never one gathered per weight)."""
    offs_b = k0 // 2 + tl.arange(0, BLOCK_K // 2)
    mask_n = offs_n < N
    mask = mask_n[:, None] if EVEN_K else mask_n[:, None] & (offs_b[None, :] < K // 2)
    rows = offs_n.to(tl.int64)[:, None] * stride_qn  # N * K / 2 bytes can pass 2**31
    packed = tl.load(qbytes_ptr + rows + offs_b[None, :], mask=mask, other=0,
                     eviction_policy="evict_first").to(tl.int32)  # fmt: skip
    nibbles = tl.join((packed & 0xF) | MAGIC_BITS, (packed >> 4) | MAGIC_BITS)  # [BN, BK/2, 2]
    biased = tl.reshape(nibbles, (BLOCK_N, BLOCK_K)).to(tl.float32, bitcast=True)
    # (if / else, not an early return: the JIT compiles what follows a return in a static if)
    if GROUP_SIZE % BLOCK_K == 0:  # the tile lies in one group: one scale (and zero) per row
        group = k0 // GROUP_SIZE
        scales = tl.load(scales_ptr + offs_n * stride_sn + group, mask=mask_n, other=0.0)
        offset = tl.full((BLOCK_N,), MAGIC_OFFSET, tl.float32)
        if HAS_ZEROS:
            zeros = tl.load(zeros_ptr + offs_n * stride_zn + group, mask=mask_n, other=0)
            offset = offset + zeros.to(tl.float32)
        w = (biased - offset[:, None]) * scales.to(tl.float32)[:, None]
    else:
        GROUPS: tl.constexpr = BLOCK_K // GROUP_SIZE  # whole groups in the tile
        offs_g = k0 // GROUP_SIZE + tl.arange(0, GROUPS)
        mask_g = (
            mask_n[:, None] if EVEN_K else mask_n[:, None] & (offs_g[None, :] < K // GROUP_SIZE)
        )
        at = offs_n[:, None] * stride_sn + offs_g[None, :]
        scales = tl.load(scales_ptr + at, mask=mask_g, other=0.0).to(tl.float32)
        offset = tl.full((BLOCK_N, GROUPS), MAGIC_OFFSET, tl.float32)
        if HAS_ZEROS:
            at_z = offs_n[:, None] * stride_zn + offs_g[None, :]
            offset = offset + tl.load(zeros_ptr + at_z, mask=mask_g, other=0).to(tl.float32)
        codes = tl.reshape(biased, (BLOCK_N, GROUPS, GROUP_SIZE)) - offset[:, :, None]
        w = tl.reshape(codes * scales[:, :, None], (BLOCK_N, BLOCK_K))
    return w


@triton.jit
def gemv_row(
    # one row of activations, and one packed weight (pointers already at the right expert)
    x_ptr,  # fp16/bf16/fp32, elements stride_xk apart
    stride_xk,
    qbytes_ptr,  # uint8 [N, K/2]: the bytes of int32 qweight [N, K/8]; low nibble = even k
    scales_ptr,  # float [N, K/G]
    zeros_ptr,  # int8 [N, K/G] or None
    # tile: output rows offs_n [BLOCK_N], K blocks [kb_start, kb_end)
    offs_n,
    kb_start,
    kb_end,
    # sizes and row strides (elements)
    N,
    K,
    stride_qn,  # bytes per row of qbytes
    stride_sn,
    stride_zn,
    # meta
    GROUP_SIZE: tl.constexpr,
    HAS_ZEROS: tl.constexpr,
    EVEN_K: tl.constexpr,  # K % BLOCK_K == 0: no mask along K
    INTERPRET: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """fp32 [BLOCK_N]: sum over the K blocks of x[k] * w[n, k], w rounded to x's dtype.

    The GEMV form: bytes are loaded once (vectorized) and split into nibbles that join/reshape
    put back in k order in registers, so x is one contiguous vector load per block. Products
    accumulate elementwise across the loop: one cross-lane reduction at the end.
    """
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    mask_n = offs_n < N
    # int64 row offsets: N * K / 2 bytes can pass 2**31 (large vocab heads).
    rows = offs_n.to(tl.int64)[:, None] * stride_qn
    for kb in range(kb_start, kb_end):
        k0 = kb * BLOCK_K
        offs_b = k0 // 2 + tl.arange(0, BLOCK_K // 2)
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask = mask_n[:, None] if EVEN_K else mask_n[:, None] & (offs_b[None, :] < K // 2)
        ptrs = qbytes_ptr + rows + offs_b[None, :]
        packed = tl.load(ptrs, mask=mask, other=0, eviction_policy="evict_first").to(tl.int32)
        nibbles = tl.join((packed & 0xF) | MAGIC_BITS, (packed >> 4) | MAGIC_BITS)
        biased = tl.reshape(nibbles, (BLOCK_N, BLOCK_K)).to(tl.float32, bitcast=True)
        if GROUP_SIZE % BLOCK_K == 0:
            # The whole tile lies in one group: one scale (and zero) per row.
            group = k0 // GROUP_SIZE
            scales = tl.load(scales_ptr + offs_n * stride_sn + group, mask=mask_n, other=0.0)
            scales = scales.to(tl.float32)[:, None]
            offset = MAGIC_OFFSET
            if HAS_ZEROS:
                zeros = tl.load(zeros_ptr + offs_n * stride_zn + group, mask=mask_n, other=0)
                offset = MAGIC_OFFSET + zeros.to(tl.float32)[:, None]
        else:
            group = offs_k // GROUP_SIZE
            mask_g = mask_n[:, None] if EVEN_K else mask_n[:, None] & (offs_k[None, :] < K)
            scales = tl.load(
                scales_ptr + offs_n[:, None] * stride_sn + group[None, :], mask=mask_g, other=0.0
            ).to(tl.float32)
            offset = MAGIC_OFFSET
            if HAS_ZEROS:
                zeros = tl.load(
                    zeros_ptr + offs_n[:, None] * stride_zn + group[None, :], mask=mask_g, other=0
                )
                offset = MAGIC_OFFSET + zeros.to(tl.float32)
        # Same rounding as dequantize(p, dtype=x.dtype); the products are summed in fp32.
        w = cast_rne((biased - offset) * scales, x_ptr.dtype.element_ty, INTERPRET)
        if EVEN_K:
            x = tl.load(x_ptr + offs_k * stride_xk)
        else:
            x = tl.load(x_ptr + offs_k * stride_xk, mask=offs_k < K, other=0.0)
        acc += w.to(tl.float32) * x.to(tl.float32)[None, :]
    return tl.sum(acc, axis=1)


@triton.jit
def dot_acc(a, b, acc, DOT_FP32: tl.constexpr):
    """acc + a @ b on the tensor cores, fp32 accumulation; DOT_FP32: both operands upcast to
    fp32 with IEEE products (the interpreter's bf16 dot is wrong, and fp32 activations must not
    drop to TF32)."""
    if DOT_FP32:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    return tl.dot(a, b, acc)


@triton.jit
def cast_rne(x, DTYPE: tl.constexpr, INTERPRET: tl.constexpr):
    """fp32 x cast to DTYPE, rounding to nearest even.

    The interpreter truncates fp32 -> bf16, so there the rounding is done on the bits first
    (as `qatpass.scheme.round_to_dtype` does); GPUs round in the cast itself.
    """
    if INTERPRET and DTYPE == tl.bfloat16:
        bits = x.to(tl.int32, bitcast=True)
        bits = bits + (0x7FFF + ((bits >> 16) & 1))
        x = (bits & -65536).to(tl.float32, bitcast=True)
    return x.to(DTYPE)


def interpreting() -> bool:
    """Whether Triton kernels run in the interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def use_fp32_dot(x: torch.Tensor) -> bool:
    """Upcast tl.dot operands to fp32: under the interpreter (bf16 dot is wrong there) or fp32 x."""
    return interpreting() or x.device.type == "cpu" or x.dtype == torch.float32


@functools.cache
def _cuda_sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


@dataclass(frozen=True)
class Launch:
    """One kernel launch as a launcher issued it: the kernel, its grid and its arguments."""

    kernel: Any
    grid: Any  # a tuple, or a callable of the config's meta-parameters (autotuned kernels)
    kwargs: dict


# While `capture_launches` is active: launches are recorded here instead of run, and num_sms
# reports the SM count it was given (static analysis of what a GPU would run, on meta tensors).
_captured: list[Launch] | None = None
_assumed_sms: int | None = None


@contextlib.contextmanager
def capture_launches(sms: int) -> Iterator[list[Launch]]:
    """Record (do not run) every kernel launch inside, as on a GPU with `sms` SMs."""
    global _captured, _assumed_sms
    saved = _captured, _assumed_sms
    _captured, _assumed_sms = [], sms
    try:
        yield _captured
    finally:
        _captured, _assumed_sms = saved


def launch(kernel, grid: tuple | Callable, kwargs: dict) -> None:
    """Run `kernel[grid](**kwargs)` (through wrap_triton while tracing), or record it."""
    if _captured is not None:
        _captured.append(Launch(kernel, grid, kwargs))
        return
    from torch.fx.experimental.proxy_tensor import get_proxy_mode

    if torch.compiler.is_compiling() or get_proxy_mode() is not None:
        wrap_triton(kernel)[grid](**kwargs)
    else:
        kernel[grid](**kwargs)


def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device; a small stand-in elsewhere."""
    if _assumed_sms is not None:
        return _assumed_sms
    if device.type == "cuda" and not interpreting():
        return _cuda_sm_count(device.index if device.index is not None else 0)
    return INTERPRETER_NUM_SMS


def fitting_configs(configs: list, fits, group_size: int) -> list:
    """Configs whose tiles fit the shape (`fits`), narrowed to those whose BLOCK_K divides the
    group size when any do (one scale per row per K step instead of a gather); the smallest
    config when none fits. Never empty."""
    kept = [c for c in configs if fits(c)]
    in_group = [c for c in kept if group_size % c.kwargs["BLOCK_K"] == 0]
    if in_group or kept:
        return in_group or kept
    return [min(configs, key=lambda c: sum(v for v in c.kwargs.values() if isinstance(v, int)))]


def check_device(x: torch.Tensor, tensors: dict[str, torch.Tensor | None]) -> None:
    """All tensors on x's device, and that device one Triton can run on."""
    for name, t in tensors.items():
        if t is not None and t.device != x.device:
            raise ValueError(f"{name} is on {t.device} but x is on {x.device}")
    if x.device.type == "cpu" and not interpreting():
        raise RuntimeError(
            "qatpass Triton kernels need a GPU; on CPU they run only in the Triton interpreter "
            "(set TRITON_INTERPRET=1 before triton is imported)"
        )


def check_packed(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor | None,
    bias: torch.Tensor | None,
    group_size: int,
    experts: bool,
) -> tuple[int, int, int]:
    """`check_packed_args`, then that Triton can run on x's device; returns (N, K, group)."""
    out = check_packed_args(x, qweight, scales, zeros, bias, group_size, experts)
    check_device(x, {})
    return out
