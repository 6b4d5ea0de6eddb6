"""The W4A16 ops: `qatpass::w4a16_linear` and `qatpass::w4a16_grouped_linear` (MoE experts).

    y = torch.ops.qatpass.w4a16_linear(x, qweight, scales, zeros, bias, group_size=32)
    y = torch.ops.qatpass.w4a16_grouped_linear(x, qweight, scales, ids, zeros, bias,
                                               group_size=32)

Inputs are the canonical packed format (`qatpass.scheme`): qweight int32 [N, K/8], scales
[N, K/G], zeros int8 [N, K/G] or None (symmetric), bias [N] or None; experts add a leading E and
take one expert id per row of x (`expert_ids` [T]). group_size -1 means per channel. Output:
[..., N] in x.dtype, equal to `F.linear(x, dequantize(p, x.dtype), bias)` up to summation order
(and, on the CPU fast paths, the rounding of the weights to x.dtype, which the kernels skip).

Both are `torch.library.triton_op`s whose body branches on the device: CUDA runs the Triton
launchers of `qatpass.triton_kernels` (imported there, lazily); CPU calls an opaque custom op
that picks, per call: qatpass's native AVX-512 kernel on the canonical format
(`cpu_kernel.native_linear`, bf16/fp32 activations), else aten's int4 GEMM on the optional
`cpu_packed` / `cpu_scales_zeros` repack (built once by the caller where the native kernel does
not apply, see `cpu_int4.pack_for_cpu`), else the dequantizing fallback. torch.compile traces
into the body (Inductor sees the Triton kernels), torch.export keeps the op as one node. The
grouped CPU body loops over the experts present, which is data dependent, also opaque.
"""

from __future__ import annotations

import torch

from qatpass.lowering.cpu_int4 import dequant_linear, int4pack_linear
from qatpass.lowering.cpu_kernel import library, native_reason, run_native
from qatpass.packed_args import check_packed_args

__all__ = ["w4a16_linear", "w4a16_grouped_linear", "linear"]


def _use_cpu_cache(
    x: torch.Tensor,
    n: int,
    k: int,
    cpu_packed: torch.Tensor | None,
    cpu_scales_zeros: torch.Tensor | None,
    experts: bool,
) -> bool:
    """Whether the CPU repack applies to this call (present, on CPU, for x's dtype)."""
    if cpu_packed is None or cpu_scales_zeros is None:
        return False
    lead = 1 if experts else 0
    if cpu_packed.dtype != torch.uint8 or tuple(cpu_packed.shape[lead:]) != (n, k // 2):
        raise ValueError(
            f"w4a16: cpu_packed must be uint8 [..., {n}, {k // 2}], got {cpu_packed.dtype} "
            f"{tuple(cpu_packed.shape)}"
        )
    sz = cpu_scales_zeros.shape
    if len(sz) != 3 + lead or sz[-2:] != (n, 2) or k % sz[-3]:
        raise ValueError(f"w4a16: cpu_scales_zeros must be [..., K/g, {n}, 2], got {tuple(sz)}")
    return cpu_packed.device.type == "cpu" and cpu_scales_zeros.dtype == x.dtype


def _cpu_linear(
    x2d: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor | None,
    bias: torch.Tensor | None,
    cpu_packed: torch.Tensor | None,
    cpu_scales_zeros: torch.Tensor | None,
    *,
    group_size: int,
    fast: bool,
) -> torch.Tensor:
    """One CPU matmul: qatpass's native kernel, else aten's int4 GEMM on the repack (`fast`),
    else the dequantizing fallback. group_size is the effective group."""
    k = x2d.shape[-1]
    if native_reason(x2d.dtype, scales.dtype, k, group_size) is None:
        return run_native(library(), x2d, qweight, scales, zeros, bias, group_size)
    if fast:
        return int4pack_linear(x2d, cpu_packed, cpu_scales_zeros, bias)
    return dequant_linear(x2d, qweight, scales, zeros, bias, group_size=group_size)


# The CPU bodies are registered straight on the dispatcher (a CPU kernel and a fake): about 2 us
# per call where `torch.library.custom_op`'s Python wrapper costs about 11 us, which shows on
# small decode matmuls.
_LIB = torch.library.Library("qatpass", "FRAGMENT")
_LIB.define(
    "w4a16_linear_cpu(Tensor x, Tensor qweight, Tensor scales, Tensor? zeros, Tensor? bias, "
    "int group_size, Tensor? cpu_packed, Tensor? cpu_scales_zeros) -> Tensor"
)
_LIB.define(
    "w4a16_grouped_linear_cpu(Tensor x, Tensor qweight, Tensor scales, Tensor? zeros, "
    "Tensor? bias, Tensor expert_ids, int group_size, Tensor? cpu_packed, "
    "Tensor? cpu_scales_zeros) -> Tensor"
)


def _linear_cpu(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor | None,
    bias: torch.Tensor | None,
    group_size: int,
    cpu_packed: torch.Tensor | None,
    cpu_scales_zeros: torch.Tensor | None,
) -> torch.Tensor:
    """CPU body of `w4a16_linear` on x [M, K] (opaque: the native kernel is a foreign call)."""
    n, k = qweight.shape[-2], qweight.shape[-1] * 8
    fast = _use_cpu_cache(x, n, k, cpu_packed, cpu_scales_zeros, experts=False)
    return _cpu_linear(x, qweight, scales, zeros, bias, cpu_packed, cpu_scales_zeros,
                       group_size=group_size, fast=fast)  # fmt: skip


_LIB.impl("w4a16_linear_cpu", _linear_cpu, "CPU")


@torch.library.register_fake("qatpass::w4a16_linear_cpu")
def _linear_cpu_fake(x, qweight, scales, zeros, bias, group_size, cpu_packed, cpu_scales_zeros):
    return x.new_empty((x.shape[0], qweight.shape[-2]))


@torch.library.triton_op("qatpass::w4a16_linear", mutates_args=())
def w4a16_linear(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    cpu_packed: torch.Tensor | None = None,
    cpu_scales_zeros: torch.Tensor | None = None,
    *,
    group_size: int,
) -> torch.Tensor:
    """x [..., K] @ W.T (+ bias) with W packed (see the module docstring) -> [..., N]."""
    if x.device.type == "cuda":
        check_packed_args(x, qweight, scales, zeros, bias, group_size, experts=False)
        from qatpass.triton_kernels import w4a16_matmul

        return w4a16_matmul(x, qweight, scales, zeros, group_size=group_size, bias=bias)
    return _linear_on_cpu(x, qweight, scales, zeros, bias, cpu_packed, cpu_scales_zeros, group_size)


def _linear_on_cpu(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor | None,
    bias: torch.Tensor | None,
    cpu_packed: torch.Tensor | None,
    cpu_scales_zeros: torch.Tensor | None,
    group_size: int,
) -> torch.Tensor:
    """Validate, flatten x to [M, K], run the CPU body, restore x's leading dims."""
    n, k, g = check_packed_args(x, qweight, scales, zeros, bias, group_size, experts=False)
    y = torch.ops.qatpass.w4a16_linear_cpu(
        x.reshape(-1, k), qweight, scales, zeros, bias, g, cpu_packed, cpu_scales_zeros
    )
    return y.reshape(*x.shape[:-1], n)


def linear(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    cpu_packed: torch.Tensor | None = None,
    cpu_scales_zeros: torch.Tensor | None = None,
    *,
    group_size: int,
) -> torch.Tensor:
    """`w4a16_linear` as modules call it: in eager mode on CPU straight to the CPU body (the same
    kernels, minus the triton_op wrapper's ~30 us per call); traced, the op itself."""
    tracing = torch.compiler.is_compiling() or torch.compiler.is_exporting()
    if tracing or x.device.type != "cpu":
        return torch.ops.qatpass.w4a16_linear(
            x, qweight, scales, zeros, bias, cpu_packed, cpu_scales_zeros, group_size=group_size
        )
    return _linear_on_cpu(x, qweight, scales, zeros, bias, cpu_packed, cpu_scales_zeros, group_size)


def _grouped_cpu(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor | None,
    bias: torch.Tensor | None,
    expert_ids: torch.Tensor,
    group_size: int,
    cpu_packed: torch.Tensor | None,
    cpu_scales_zeros: torch.Tensor | None,
) -> torch.Tensor:
    """CPU body of the grouped op: one matmul per expert present, on that expert's rows."""
    n, k = qweight.shape[-2], qweight.shape[-1] * 8
    out = torch.zeros((x.shape[0], n), dtype=x.dtype, device=x.device)
    if x.shape[0] == 0:
        return out
    num_experts = qweight.shape[0]
    lo, hi = int(expert_ids.min()), int(expert_ids.max())
    if lo < 0 or hi >= num_experts:
        raise ValueError(
            f"w4a16_grouped_linear: expert_ids must lie in [0, {num_experts}), got [{lo}, {hi}]"
        )
    fast = _use_cpu_cache(x, n, k, cpu_packed, cpu_scales_zeros, experts=True)
    ids, order = torch.sort(expert_ids)
    counts = torch.bincount(ids, minlength=num_experts).tolist()
    start = 0
    for e, count in enumerate(counts):
        if count == 0:
            continue
        rows = order[start : start + count]
        start += count
        xe = x.index_select(0, rows)
        be = None if bias is None else bias[e]
        ye = _cpu_linear(
            xe,
            qweight[e],
            scales[e],
            None if zeros is None else zeros[e],
            be,
            cpu_packed[e] if fast else None,
            cpu_scales_zeros[e] if fast else None,
            group_size=group_size,
            fast=fast,
        )
        out.index_copy_(0, rows, ye)
    return out


_LIB.impl("w4a16_grouped_linear_cpu", _grouped_cpu, "CPU")


@torch.library.register_fake("qatpass::w4a16_grouped_linear_cpu")
def _grouped_cpu_fake(x, qweight, scales, zeros, bias, expert_ids, group_size, cpu_packed, cpu_sz):
    return x.new_empty((x.shape[0], qweight.shape[-2]))


@torch.library.triton_op("qatpass::w4a16_grouped_linear", mutates_args=())
def w4a16_grouped_linear(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    expert_ids: torch.Tensor,
    zeros: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    cpu_packed: torch.Tensor | None = None,
    cpu_scales_zeros: torch.Tensor | None = None,
    *,
    group_size: int,
) -> torch.Tensor:
    """Row t of x [T, K] times expert expert_ids[t]'s packed weight [E, N, K/8] -> [T, N]."""
    n, k, g = check_packed_args(x, qweight, scales, zeros, bias, group_size, experts=True)
    if x.dim() != 2:
        raise ValueError(f"w4a16_grouped_linear: x must be [T, K], got {tuple(x.shape)}")
    if expert_ids.dtype not in (torch.int32, torch.int64) or expert_ids.dim() != 1:
        raise TypeError(
            f"w4a16_grouped_linear: expert_ids must be a 1-d int32/int64 tensor, got "
            f"{expert_ids.dtype} {tuple(expert_ids.shape)}"
        )
    if expert_ids.shape[0] != x.shape[0]:
        raise ValueError(
            f"w4a16_grouped_linear: {expert_ids.shape[0]} expert ids for {x.shape[0]} rows of x"
        )
    if x.device.type == "cuda":
        from qatpass.triton_kernels import w4a16_grouped_matmul

        return w4a16_grouped_matmul(
            x, qweight, scales, zeros, expert_ids=expert_ids, group_size=group_size, bias=bias
        )
    return torch.ops.qatpass.w4a16_grouped_linear_cpu(
        x, qweight, scales, zeros, bias, expert_ids, g, cpu_packed, cpu_scales_zeros
    )
