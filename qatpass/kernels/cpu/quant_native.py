"""INT4 quantize-and-pack in C: the scheme's formulas in one pass over the weight, bit for bit.

    out = quantize_int4_native(x, scheme)   # (qweight, scales, zeros) or None: use the torch path

`x` is the weight with its reduction dim last ([..., K], contiguous, fp32 / bf16 / fp16, CPU);
the result is what `scheme._int4_quantize`'s torch formulas give (int32 qweight [..., K/8],
scales [..., K/G] in the scale dtype, int8 zeros or None), checked against them in
tests/test_native_quant.py. Non-finite values raise the error `scheme.quantize` raises; a group
beyond what the scale dtype represents returns None, so the torch path raises its own message.
Source: `csrc/quant_cpu.c`, built and verified by `build.load_kernel` (`QATPASS_CPU_KERNEL=0`
turns it off); `disabled()` forces the torch path within a block (for comparisons and tests).
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
from collections.abc import Iterator
from pathlib import Path

import torch

from qatpass.kernels.cpu.build import load_kernel

__all__ = ["disabled", "quant_kernel_reason", "quantize_int4_native"]

_SOURCE = Path(__file__).with_name("csrc") / "quant_cpu.c"
# no -ffast-math: IEEE division and rounding, subnormals kept; no contraction into fma
_FLAGS = ("-O3", "-shared", "-fPIC", "-fopenmp", "-ffp-contract=off", "-fno-math-errno")
_W_KIND = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
_S_KIND = {torch.bfloat16: 0, torch.float16: 1, torch.float32: 2}
_BAD_NONFINITE, _BAD_TOO_LARGE = 1, 2
_I64, _INT, _PTR, _F32 = ctypes.c_int64, ctypes.c_int, ctypes.c_void_p, ctypes.c_float


@functools.cache
def _load() -> tuple[ctypes.CDLL | None, str | None]:
    """(library, None) or (None, why it is unavailable). Built at most once per process."""
    lib, why = load_kernel(_SOURCE, _FLAGS, "quant_cpu", "INT4 quantize")
    if lib is None:
        return None, why
    lib.qp_quant_int4.argtypes = [_PTR, _INT, _I64, _I64, _INT, _INT, _INT, _F32, _INT, _F32,
                                  _F32, _F32, _PTR, _PTR, _PTR, _INT, _INT]  # fmt: skip
    lib.qp_quant_int4.restype = _INT
    return lib, None


_disabled_depth = 0


@contextlib.contextmanager
def disabled() -> Iterator[None]:
    """Within the block `quantize_int4_native` returns None: the scheme's torch path runs."""
    global _disabled_depth
    _disabled_depth += 1
    try:
        yield
    finally:
        _disabled_depth -= 1


def quant_kernel_reason() -> str | None:
    """Why the native quantize does not run here (machine, build, `disabled()`), or None."""
    if _disabled_depth:
        return "disabled by qatpass.kernels.cpu.quant_native.disabled()"
    return _load()[1]


def quantize_int4_native(
    x: torch.Tensor,
    scheme,
    shape: tuple[int, ...] | torch.Size | None = None,
    *,
    _simd: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None] | None:
    """(qweight, scales, zeros) of x [..., K] (reduction dim last) for an `Int4Scheme`, or None
    where the kernel does not apply (not a plain contiguous CPU tensor, while tracing, kernel
    unavailable, a group beyond the scale dtype's range: the torch path decides). K must be
    quantizable (caller checked); `shape` (default x's) is the shape the non-finite error names.
    `_simd=False` runs the plain C loops where the AVX-512 ones would (tests)."""
    if (
        type(x) not in (torch.Tensor, torch.nn.Parameter)  # fake, functional, meta: no data
        or torch.compiler.is_compiling()
        or x.device.type != "cpu"
        or x.dtype not in _W_KIND
        or x.dim() < 2
        or not x.is_contiguous()
        or quant_kernel_reason() is not None
    ):
        return None
    k = x.shape[-1]
    g = scheme.group_size_for(k)
    if k == 0 or k % g or k % 8:
        raise ValueError(f"quantize_int4_native: K = {k} does not split into groups of {g}")
    lead = x.shape[:-1]
    qweight = torch.empty((*lead, k // 8), dtype=torch.int32)
    scales = torch.empty((*lead, k // g), dtype=scheme.scale_dtype)
    zeros = None if scheme.symmetric else torch.empty((*lead, k // g), dtype=torch.int8)
    ngroups = x.numel() // g
    if ngroups == 0:
        return qweight, scales, zeros
    sinfo = torch.finfo(scheme.scale_dtype)
    bad = _load()[0].qp_quant_int4(
        x.data_ptr(), _W_KIND[x.dtype], ngroups, g, int(scheme.symmetric), scheme.qmin,
        scheme.qmax, scheme.divisor, _S_KIND[scheme.scale_dtype], sinfo.tiny, sinfo.max,
        torch.finfo(x.dtype).max, qweight.data_ptr(), scales.data_ptr(),
        None if zeros is None else zeros.data_ptr(), torch.get_num_threads(), int(_simd),
    )  # fmt: skip
    if bad & _BAD_NONFINITE:
        count = int((~torch.isfinite(x)).sum())
        shape = tuple(x.shape if shape is None else shape)
        raise ValueError(f"weight of shape {shape} has {count} non-finite values (NaN/Inf)")
    if bad & _BAD_TOO_LARGE:
        return None
    return qweight, scales, zeros
