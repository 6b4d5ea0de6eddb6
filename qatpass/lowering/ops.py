"""The W4A16 ops: `qatpass::w4a16_linear` and `qatpass::w4a16_grouped_linear` (MoE experts).

    y = torch.ops.qatpass.w4a16_linear(x, qweight, scales, zeros, bias, group_size=32)
    y = torch.ops.qatpass.w4a16_grouped_linear(x, qweight, scales, ids, zeros, bias,
                                               group_size=32)

Inputs are the canonical packed format only (`qatpass.scheme`): qweight int32 [N, K/8], scales
[N, K/G], zeros int8 [N, K/G] or None (symmetric), bias [N] or None; experts add a leading E and
take one expert id per row of x (`expert_ids` [T]). group_size -1 means per channel. Output:
[..., N] in x.dtype, equal to `F.linear(x, dequantize(p, x.dtype), bias)` up to summation order
(and, on the CPU fast paths, the rounding of the weights to x.dtype, which the kernels skip).

Both are `torch.library.triton_op`s whose body branches on the device: CUDA runs the Triton
launchers of `qatpass.kernels.triton` (imported there, lazily); CPU calls an opaque op
(`qatpass::w4a16_linear_cpu`, validated like the public one) whose body is `kernels.cpu`: the
native kernel, aten's int4 GEMM on a repack that package caches itself, or the fallback.
torch.compile traces into the body (Inductor sees the Triton kernels), torch.export keeps the op
as one node. The grouped CPU body loops over the experts present, which is data dependent, also
opaque. Autograd: both ops differentiate with respect to x (dx = dy @ W, W dequantized in
x's dtype) and bias; the packed weights are frozen buffers.
"""

from __future__ import annotations

import torch

from qatpass.kernels.cpu import grouped_linear as _cpu_grouped
from qatpass.kernels.cpu import linear as _cpu_linear
from qatpass.kernels.cpu.int4pack import dequant_weight
from qatpass.packed_args import check_grouped_args, check_packed_args

__all__ = ["w4a16_linear", "w4a16_grouped_linear", "linear"]

# The CPU bodies are registered straight on the dispatcher (a CPU kernel and a fake): about 2 us
# per call where `torch.library.custom_op`'s Python wrapper costs about 11 us, which shows on
# small decode matmuls. Registered ops can be reached from a crafted .pt2: their bodies are
# `kernels.cpu`'s entries, which validate with the one validator before any kernel sees them.
_LIB = torch.library.Library("qatpass", "FRAGMENT")
_LIB.define(
    "w4a16_linear_cpu(Tensor x, Tensor qweight, Tensor scales, Tensor? zeros, Tensor? bias, "
    "int group_size) -> Tensor"
)
_LIB.define(
    "w4a16_grouped_linear_cpu(Tensor x, Tensor qweight, Tensor scales, Tensor? zeros, "
    "Tensor? bias, Tensor expert_ids, int group_size) -> Tensor"
)


def _linear_cpu(x, qweight, scales, zeros, bias, group_size: int) -> torch.Tensor:
    """CPU body of `w4a16_linear` on x [M, K] (opaque: the native kernel is a foreign call);
    `kernels.cpu.linear` validates, once."""
    return _cpu_linear(x, qweight, scales, zeros, bias, group_size=group_size)


def _grouped_cpu(x, qweight, scales, zeros, bias, expert_ids, group_size: int) -> torch.Tensor:
    """CPU body of the grouped op (`kernels.cpu.grouped_linear` validates, once)."""
    return _cpu_grouped(x, qweight, scales, zeros, bias, expert_ids, group_size=group_size)


_LIB.impl("w4a16_linear_cpu", _linear_cpu, "CPU")
_LIB.impl("w4a16_grouped_linear_cpu", _grouped_cpu, "CPU")


@torch.library.register_fake("qatpass::w4a16_linear_cpu")
def _linear_cpu_fake(x, qweight, scales, zeros, bias, group_size):
    check_packed_args(x, qweight, scales, zeros, bias, group_size, experts=False)
    return x.new_empty((x.shape[0], qweight.shape[-2]))


@torch.library.register_fake("qatpass::w4a16_grouped_linear_cpu")
def _grouped_cpu_fake(x, qweight, scales, zeros, bias, expert_ids, group_size):
    check_grouped_args(x, qweight, scales, zeros, bias, expert_ids, group_size)
    return x.new_empty((x.shape[0], qweight.shape[-2]))


@torch.library.triton_op("qatpass::w4a16_linear", mutates_args=())
def w4a16_linear(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    *,
    group_size: int,
) -> torch.Tensor:
    """x [..., K] @ W.T (+ bias) with W packed (see the module docstring) -> [..., N]."""
    if x.device.type == "cuda":
        from qatpass.kernels.triton import w4a16_matmul

        return w4a16_matmul(x, qweight, scales, zeros, group_size=group_size, bias=bias)
    return _linear_on_cpu(x, qweight, scales, zeros, bias, group_size)


def _linear_on_cpu(x, qweight, scales, zeros, bias, group_size: int) -> torch.Tensor:
    """Flatten x to [M, K], run the CPU body (which validates), restore x's leading dims."""
    if not isinstance(x, torch.Tensor) or x.dim() < 1:
        raise ValueError("w4a16_linear: x must be a tensor [..., K]")
    y = torch.ops.qatpass.w4a16_linear_cpu(
        x.reshape(-1, x.shape[-1]), qweight, scales, zeros, bias, group_size
    )
    return y.reshape(*x.shape[:-1], y.shape[-1])


def linear(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    *,
    group_size: int,
) -> torch.Tensor:
    """`w4a16_linear` as modules call it: in eager mode on CPU without autograd, straight to the
    CPU body (the same kernels, minus the triton_op wrapper's ~30 us per call); else the op."""
    tracing = torch.compiler.is_compiling() or torch.compiler.is_exporting()
    grad = torch.is_grad_enabled() and (
        x.requires_grad or (bias is not None and bias.requires_grad)
    )
    if tracing or grad or x.device.type != "cpu":
        return torch.ops.qatpass.w4a16_linear(
            x, qweight, scales, zeros, bias, group_size=group_size
        )
    return _linear_on_cpu(x, qweight, scales, zeros, bias, group_size)


@torch.library.triton_op("qatpass::w4a16_grouped_linear", mutates_args=())
def w4a16_grouped_linear(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    expert_ids: torch.Tensor,
    zeros: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    *,
    group_size: int,
) -> torch.Tensor:
    """Row t of x [T, K] times expert expert_ids[t]'s packed weight [E, N, K/8] -> [T, N].

    Validated once: by the Triton launcher on CUDA, by the CPU op's body on CPU."""
    if x.device.type == "cuda":
        from qatpass.kernels.triton import w4a16_grouped_matmul

        return w4a16_grouped_matmul(
            x, qweight, scales, zeros, expert_ids=expert_ids, group_size=group_size, bias=bias
        )
    return torch.ops.qatpass.w4a16_grouped_linear_cpu(
        x, qweight, scales, zeros, bias, expert_ids, group_size
    )


# --- autograd: with respect to x and bias; the packed weights are frozen ---------------------


def _frozen(ctx, names: dict[int, str]) -> None:
    for index, name in names.items():
        if ctx.needs_input_grad[index]:
            raise RuntimeError(
                f"w4a16: no gradient for {name}: packed INT4 weights are frozen (train the "
                "master weights under backend='qat4', or adapters on top of the packed model)"
            )


def _linear_setup(ctx, inputs, keyword_only_inputs, output) -> None:
    x, qweight, scales, zeros, bias = inputs
    ctx.group_size = keyword_only_inputs["group_size"]
    ctx.x_dtype = x.dtype
    ctx.has_bias = bias is not None
    _frozen(ctx, {2: "scales"})
    ctx.save_for_backward(qweight, scales, zeros)


def _linear_backward(ctx, grad):
    qweight, scales, zeros = ctx.saved_tensors
    w = dequant_weight(qweight, scales, zeros, group_size=ctx.group_size, dtype=grad.dtype)
    grad_x = (grad @ w).to(ctx.x_dtype) if ctx.needs_input_grad[0] else None
    grad_bias = None
    if ctx.has_bias and ctx.needs_input_grad[4]:
        grad_bias = grad.reshape(-1, grad.shape[-1]).sum(0)
    return grad_x, None, None, None, grad_bias


w4a16_linear.register_autograd(_linear_backward, setup_context=_linear_setup)


def _grouped_setup(ctx, inputs, keyword_only_inputs, output) -> None:
    x, qweight, scales, expert_ids, zeros, bias = inputs
    ctx.group_size = keyword_only_inputs["group_size"]
    ctx.x_dtype = x.dtype
    ctx.has_bias = bias is not None
    ctx.num_experts = qweight.shape[0]
    _frozen(ctx, {2: "scales"})
    ctx.save_for_backward(qweight, scales, zeros, expert_ids)


def _grouped_backward(ctx, grad):
    qweight, scales, zeros, expert_ids = ctx.saved_tensors
    grad_x = torch.zeros((grad.shape[0], qweight.shape[-1] * 8), dtype=ctx.x_dtype,
                         device=grad.device)  # fmt: skip
    grad_bias = None
    if ctx.has_bias and ctx.needs_input_grad[5]:
        grad_bias = torch.zeros((ctx.num_experts, grad.shape[-1]), dtype=grad.dtype,
                                device=grad.device)  # fmt: skip
        grad_bias.index_add_(0, expert_ids.long(), grad)
    if ctx.needs_input_grad[0]:
        for e in torch.unique(expert_ids).tolist():
            rows = (expert_ids == e).nonzero().squeeze(-1)
            w = dequant_weight(
                qweight[e],
                scales[e],
                None if zeros is None else zeros[e],
                group_size=ctx.group_size,
                dtype=grad.dtype,
            )
            grad_x.index_copy_(0, rows, (grad.index_select(0, rows) @ w).to(ctx.x_dtype))
    return grad_x, None, None, None, None, grad_bias


w4a16_grouped_linear.register_autograd(_grouped_backward, setup_context=_grouped_setup)
