"""qatpass's own CPU W4A16 and FP4 kernel (AVX-512 BF16), reading the canonical packed formats.

`native_linear(x2d, qweight, scales, zeros, bias, group_size)` computes x @ W.T (+ bias) straight from
the canonical int32 nibbles and the scheme's scales: no repack, so nothing but the packed weight
stays resident, and it reads 4.5 bits per weight at group 32 where aten's int4 layout reads 5
(a zero is stored next to every scale). Source: `csrc/w4a16_cpu.c`.

Applies (`native_reason` returns None) when the CPU has AVX-512 BW + BF16 + F16C, a C compiler
built the library, and: activations bfloat16 or float32, K % 32 == 0, and a group size that is
a power of two >= 32 or K (per channel); symmetric or not (zeros are folded into each group's
decode table, so the codes minus zero stay exact small integers). The rules depend on shapes and dtypes only.

The library is compiled once per machine with the system C compiler (`$CC`, else `cc`) into
`$QATPASS_CACHE_DIR` (default `~/.cache/qatpass`), keyed by a hash of the source, the flags and
the compiler's version, and verified before it is loaded (`build.py`: ownership and mode of the
directory and files, a sha256 recorded at build time; damaged files are rebuilt). Set
`QATPASS_CPU_KERNEL=0` to turn it off (the aten int4 path and the fallback remain).

FP4 (NVFP4, MXFP4: `run_fp4`, called by `fp4_native.py`) runs through the same C functions and
paths with another 16-entry table (the E2M1 values, exact in bf16) and the block scales decoded
in the kernel from their bytes, bit for bit as the scheme's `element_scales` (E4M3 / global
scale, the IEEE fp32 quotient; E8M0 as 2**(e - 127), 2**-127 included), applied per lane as
INT4's group scales: fp32 y equal to x @ dequantize(p, float32).T up to fp32 summation order, at
every thread count; K % 16 (NVFP4) or 32 (MXFP4). `disabled()` leaves FP4 alone (its fallback is
the ops' dequantize, chosen by `fp4_native.fp4_kernel_reason`).

Every call into the library first checks the invariants the C code relies on
(`check_native_args`, `check_fp4_args`), so no public or registered entry reaches it with
unchecked buffers.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import logging
from collections.abc import Iterator
from pathlib import Path

import torch

from qatpass.kernels.cpu.build import compile_library, load_kernel
from qatpass.packed_args import check_packed_args

__all__ = [
    "FP4_SCALE_KIND",
    "NATIVE_DTYPES",
    "check_fp4_args",
    "check_native_args",
    "disabled",
    "disabled_depth",
    "kernel_unavailable_reason",
    "library",
    "native_linear",
    "native_reason",
    "run_fp4",
    "run_native",
]

log = logging.getLogger(__name__)

NATIVE_DTYPES = (torch.bfloat16, torch.float32)
_SOURCE = Path(__file__).with_name("csrc") / "w4a16_cpu.c"
_FLAGS = ("-O3", "-shared", "-fPIC", "-fopenmp", "-mavx512f", "-mavx512bw", "-mavx512vl",
          "-mavx512bf16", "-mfma", "-mf16c")  # fmt: skip
_SCALE_KIND = {torch.bfloat16: 0, torch.float16: 1, torch.float32: 2}
# FP4 format -> (scale kind in the C code, its stored scale dtype, block size along K)
FP4_SCALE_KIND = {"nvfp4": (3, torch.float8_e4m3fn, 16), "mxfp4": (4, torch.uint8, 32)}
_I64, _INT, _PTR, _F32 = ctypes.c_int64, ctypes.c_int, ctypes.c_void_p, ctypes.c_float


def _compile(compiler: str, out: Path) -> None:
    """Build the library into `out` (atomically, with its sha256 record); RuntimeError with the
    compiler's message."""
    compile_library(compiler, _SOURCE, _FLAGS, out)


@functools.cache
def _load() -> tuple[ctypes.CDLL | None, str | None]:
    """(library, None) or (None, why it is unavailable). Built at most once per process."""
    lib, why = load_kernel(_SOURCE, _FLAGS, "w4a16_cpu", "W4A16")
    if lib is None:
        return None, why
    if not lib.qp_cpu_supported():
        return None, "this CPU lacks AVX-512 BW/BF16 or F16C"
    _declare(lib)
    return lib, None


def _declare(lib: ctypes.CDLL) -> None:
    """The C signatures (csrc/w4a16_cpu.c), so ctypes converts the arguments."""
    lib.qp_w4a16_bf16.argtypes = [_PTR, _I64, _PTR, _PTR, _INT, _F32, _PTR, _PTR, _PTR, _INT,
                                  _I64, _I64, _I64, _I64, _INT]  # fmt: skip
    lib.qp_w4a16_bf16.restype = _INT
    lib.qp_w4a16_f32.argtypes = [_PTR, _I64, _PTR, _PTR, _INT, _F32, _PTR, _PTR, _PTR, _I64,
                                 _I64, _I64, _I64, _INT]  # fmt: skip
    lib.qp_w4a16_f32.restype = _INT
    lib.qp_arrange_bf16.argtypes = [_PTR, _I64, _I64, _I64, _PTR]
    lib.qp_arrange_bf16.restype = None
    lib.qp_w4a16_gemm_bf16.argtypes = lib.qp_w4a16_bf16.argtypes
    lib.qp_w4a16_gemm_bf16.restype = _INT
    lib.qp_gemm_supported.restype = _INT
    lib.qp_bf16_dot_peak.argtypes = [_I64, _INT]
    lib.qp_bf16_dot_peak.restype = _F32


_disabled_depth = 0


@contextlib.contextmanager
def disabled() -> Iterator[None]:
    """Within the block the native kernel is not used (aten's int4 path or the fallback run).

    For comparisons and tests; `convert` inside the block also builds the aten repack.
    """
    global _disabled_depth
    _disabled_depth += 1
    try:
        yield
    finally:
        _disabled_depth -= 1


def disabled_depth() -> int:
    """How many `disabled()` blocks enclose this call (0: the kernel may run)."""
    return _disabled_depth


def library() -> ctypes.CDLL | None:
    """The loaded kernel library, or None where `kernel_unavailable_reason` says why."""
    return None if _disabled_depth else _load()[0]


def kernel_unavailable_reason() -> str | None:
    """Why the native kernel cannot run here (machine, build, `disabled()`), or None."""
    if _disabled_depth:
        return "disabled by qatpass.kernels.cpu.native.disabled()"
    return _load()[1]


def native_reason(
    x_dtype: torch.dtype, scale_dtype: torch.dtype, k: int, group_size: int
) -> str | None:
    """Why a [*, k] weight cannot take the native kernel for `x_dtype` activations, or None.

    group_size is the effective group (K when per channel).
    """
    machine = kernel_unavailable_reason()
    if machine is not None:
        return machine
    if x_dtype not in NATIVE_DTYPES:
        return f"activation dtype {x_dtype} (the native kernel takes bfloat16/float32)"
    if scale_dtype not in _SCALE_KIND:
        return f"scale dtype {scale_dtype}"
    if k % 32 or group_size % 32:
        return f"K={k} and group size {group_size} must be multiples of 32"
    if group_size != k and group_size & (group_size - 1):
        return f"group size {group_size} is neither a power of two nor K={k}"
    return None


def native_linear(
    x2d: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor | None,
    bias: torch.Tensor | None,
    group_size: int,
) -> torch.Tensor:
    """x2d [M, K] @ W.T (+ bias) -> [M, N] in x2d.dtype, on the native kernel at every M.

    Shapes, dtypes and devices are checked here; ValueError when `native_reason` refuses the
    call. (`kernels.cpu.linear` picks between this and the GEMM on decoded strips per M.)
    """
    lib, why = _load()
    if lib is None:
        raise RuntimeError(f"qatpass: the native CPU kernel is unavailable: {why}")
    if x2d.dim() != 2:
        raise ValueError(f"native_linear: x must be [M, K], got {tuple(x2d.shape)}")
    _, k, g = check_packed_args(x2d, qweight, scales, zeros, bias, group_size, experts=False)
    if x2d.device.type != "cpu":
        raise ValueError(f"native_linear: tensors must be on CPU, got {x2d.device}")
    refused = native_reason(x2d.dtype, scales.dtype, k, g)
    if refused is not None:
        raise ValueError(f"native_linear: {refused}")
    return run_native(lib, x2d, qweight, scales, zeros, bias, g)


def check_native_args(
    x2d: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor | None,
    bias: torch.Tensor | None,
    group_size: int,
) -> tuple[int, int, int]:
    """The invariants the C code relies on (sizes of every buffer it reads, dtypes, CPU); cheap
    (~2 us), so every call into the library checks them even after `check_packed_args`.

    Returns (M, N, K); ValueError naming the argument otherwise.
    """
    xs, qs = x2d.shape, qweight.shape
    if len(xs) != 2 or x2d.dtype not in NATIVE_DTYPES or not x2d.is_cpu:
        raise ValueError(
            f"native kernel: x must be a 2-d bfloat16/float32 CPU tensor, got {x2d.dtype} "
            f"{tuple(xs)} on {x2d.device}"
        )
    m, k = xs
    if len(qs) != 2 or qweight.dtype != torch.int32 or qs[1] * 8 != k:
        raise ValueError(
            f"native kernel: qweight must be int32 [N, K/8] = [N, {k // 8}], got "
            f"{qweight.dtype} {tuple(qs)}"
        )
    n = qs[0]
    g = group_size
    if k % 32 or g <= 0 or g % 32 or k % g or (g != k and g & (g - 1)):
        raise ValueError(f"native kernel: K={k} and group_size={g} violate its rules")
    want = (n, k // g)
    if scales.shape != want or scales.dtype not in _SCALE_KIND:
        raise ValueError(f"native kernel: scales must be {want}, got {tuple(scales.shape)}")
    if zeros is not None and (zeros.shape != want or zeros.dtype != torch.int8):
        raise ValueError(f"native kernel: zeros must be int8 {want}, got {tuple(zeros.shape)}")
    if bias is not None and bias.shape != (n,):
        raise ValueError(f"native kernel: bias must be ({n},), got {tuple(bias.shape)}")
    for name, t in (("qweight", qweight), ("scales", scales), ("zeros", zeros), ("bias", bias)):
        if t is not None and not t.is_cpu:
            raise ValueError(f"native kernel: {name} must be on CPU, got {t.device}")
    return m, n, k


def _weight_ptrs(qweight, scales, zeros):
    """Contiguous weight buffers (kept alive by the caller) and the zeros pointer."""
    qweight, scales = qweight.contiguous(), scales.contiguous()
    zeros = None if zeros is None else zeros.contiguous()
    return qweight, scales, zeros, None if zeros is None else zeros.data_ptr()


def _x_rows(x2d: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(x with unit stride along K, its row stride): rows may be strided, the C code takes the
    row stride. (`stride()` once: `stride(i)` costs 0.35 us a call, which shows at decode.)"""
    row, col = x2d.stride()
    if col == 1 and row >= x2d.shape[1]:
        return x2d, row
    x2d = x2d.contiguous()
    return x2d, x2d.shape[1]


def run_native(
    lib: ctypes.CDLL,
    x2d: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor | None,
    bias: torch.Tensor | None,
    group_size: int,
    *,
    gemm: bool = False,
) -> torch.Tensor:
    """`native_linear` minus the machine checks, for callers that chose the path (the ops);
    `gemm`: the GEMM on decoded strips (bf16 x, `gemm.py`) instead of the per-tile decode.

    The invariants the C code relies on are checked again here (`check_native_args`).
    """
    m, n, k = check_native_args(x2d, qweight, scales, zeros, bias, group_size)
    qweight, scales, zeros, zeros_ptr = _weight_ptrs(qweight, scales, zeros)
    bias32 = None if bias is None else bias.detach().to(torch.float32).contiguous()
    y = torch.empty(m, n, dtype=x2d.dtype)
    kind = _SCALE_KIND[scales.dtype]
    _call(lib, x2d, qweight, scales, kind, 1.0, zeros_ptr, bias32, y, group_size, gemm)
    return y


def _call(lib, x2d, qweight, scales, kind: int, gscale: float, zeros_ptr, bias32, y, g: int,
          gemm: bool) -> None:  # fmt: skip
    """One call into the library on checked, contiguous buffers; y [M, N] is written (bf16 or
    fp32 for bf16 x, fp32 for fp32 x)."""
    (m, k), n = x2d.shape, qweight.shape[0]
    if m == 0 or n == 0:
        return
    x2d, ldx = _x_rows(x2d)
    threads = torch.get_num_threads()
    bias_ptr = None if bias32 is None else bias32.data_ptr()
    bf16 = x2d.dtype == torch.bfloat16
    fn = (lib.qp_w4a16_gemm_bf16 if gemm else lib.qp_w4a16_bf16) if bf16 else lib.qp_w4a16_f32
    extra = ((2 if y.dtype == torch.float32 else 0),) if bf16 else ()  # bf16 x: y's dtype
    rc = fn(x2d.data_ptr(), ldx, qweight.data_ptr(), scales.data_ptr(), kind, gscale,
            zeros_ptr, bias_ptr, y.data_ptr(), *extra, m, n, k, g, threads)  # fmt: skip
    if rc == -2:
        raise RuntimeError(f"native kernel: refused scale kind {kind} with group size {g}")
    if rc:
        raise MemoryError("native kernel: no memory for the arranged activations or buffers")


def check_fp4_args(
    x2d: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    global_scale: torch.Tensor | None,
    fmt: str,
) -> tuple[int, int, int]:
    """The invariants the C code relies on for an FP4 call (as `check_native_args` for INT4).

    Returns (M, N, K); ValueError naming the argument otherwise.
    """
    if fmt not in FP4_SCALE_KIND:
        raise ValueError(f"fp4 kernel: fmt must be one of {sorted(FP4_SCALE_KIND)}, got {fmt!r}")
    _, scale_dtype, block = FP4_SCALE_KIND[fmt]
    xs, qs = x2d.shape, qweight.shape
    if len(xs) != 2 or x2d.dtype not in NATIVE_DTYPES or not x2d.is_cpu:
        raise ValueError(
            f"fp4 kernel: x must be a 2-d bfloat16/float32 CPU tensor, got {x2d.dtype} "
            f"{tuple(xs)} on {x2d.device}"
        )
    m, k = xs
    if len(qs) != 2 or qweight.dtype != torch.int32 or qs[1] * 8 != k or k % block:
        raise ValueError(
            f"fp4 kernel: qweight must be int32 [N, K/8] = [N, {k // 8}] with K % {block} == 0, "
            f"got {qweight.dtype} {tuple(qs)}"
        )
    n = qs[0]
    want = (n, k // block)
    if scales.shape != want or scales.dtype != scale_dtype:
        raise ValueError(
            f"fp4 kernel: {fmt} scales must be {scale_dtype} {want}, got {scales.dtype} "
            f"{tuple(scales.shape)}"
        )
    if (fmt == "nvfp4") != (global_scale is not None):
        raise ValueError(
            f"fp4 kernel: global_scale is {'required' if fmt == 'nvfp4' else 'not used'} for {fmt}"
        )
    if global_scale is not None and global_scale.numel() != 1:
        raise ValueError(
            f"fp4 kernel: global_scale must hold one value, got {tuple(global_scale.shape)}"
        )
    for name, t in (("qweight", qweight), ("scales", scales), ("global_scale", global_scale)):
        if t is not None and not t.is_cpu:
            raise ValueError(f"fp4 kernel: {name} must be on CPU, got {t.device}")
    return m, n, k


def run_fp4(
    lib: ctypes.CDLL,
    x2d: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    global_scale: torch.Tensor | None,
    fmt: str,
    *,
    gemm: bool = False,
) -> torch.Tensor:
    """fp32 x2d [M, K] @ W.T for an FP4 weight (NVFP4 / MXFP4), no bias -> fp32 [M, N]; `gemm` as
    for `run_native` (bf16 x). Checked here (`check_fp4_args`)."""
    m, n, _ = check_fp4_args(x2d, qweight, scales, global_scale, fmt)
    kind, _, block = FP4_SCALE_KIND[fmt]
    qweight = qweight.contiguous()
    scales = scales.contiguous().view(torch.uint8)  # the bytes the C code decodes
    gscale = 1.0 if global_scale is None else float(global_scale.reshape(()).float())
    y = torch.empty((m, n), dtype=torch.float32)
    _call(lib, x2d, qweight, scales, kind, gscale, None, None, y, block, gemm)
    return y
