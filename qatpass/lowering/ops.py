"""The serving ops: INT4 `qatpass::w4a16_linear` / `w4a16_grouped_linear` (MoE experts), FP4
`qatpass::fp4_linear` / `fp4_grouped_linear`, and `serving(scheme)`, which says which ops and
which packed tensors serve a scheme (the one place modules, PackedTensor and the lowering ask).

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
opaque. The FP4 ops are `custom_op`s: on CPU qatpass's FP4 kernel (`kernels.cpu.fp4_native`,
AVX-512 table decode) where it applies, on CUDA the Triton kernel (`kernels.triton.fp4`), both
x @ dequantize(p, float32).T in fp32; else the scheme's dequantize + F.linear,
`F.linear(x, dequantize(p, x.dtype), bias)`.
Autograd: all ops differentiate with respect to x (dx = dy @ W, W dequantized in
x's dtype) and bias; the packed weights are frozen buffers.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from qatpass.kernels.cpu import grouped_linear as _cpu_grouped
from qatpass.kernels.cpu import linear as _cpu_linear
from qatpass.kernels.cpu.fp4_native import fp4_native_linear
from qatpass.kernels.cpu.int4pack import dequant_weight
from qatpass.packed_args import check_grouped_args, check_packed_args
from qatpass.scheme import PackedWeight, QuantScheme, dequantize
from qatpass.scheme_fp4 import Fp4Scheme

__all__ = [
    "w4a16_linear",
    "w4a16_grouped_linear",
    "linear",
    "fp4_linear",
    "fp4_grouped_linear",
    "Serving",
    "serving",
]

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


def _linear_on_cpu(x, qweight, scales, zeros, bias, group_size: int, body=None) -> torch.Tensor:
    """Flatten x to [M, K], run a CPU body on it (which validates), restore x's leading dims.
    The body is the opaque op `qatpass::w4a16_linear_cpu` (what graphs hold), or its
    implementation `_linear_cpu` itself for eager calls (`linear`)."""
    if not isinstance(x, torch.Tensor) or x.dim() < 1:
        raise ValueError("w4a16_linear: x must be a tensor [..., K]")
    body = body or torch.ops.qatpass.w4a16_linear_cpu
    if x.dim() == 2:
        return body(x, qweight, scales, zeros, bias, group_size)
    y = body(x.reshape(-1, x.shape[-1]), qweight, scales, zeros, bias, group_size)
    return y.reshape(*x.shape[:-1], y.shape[-1])


def _eager_cpu_inference(x: torch.Tensor, bias: torch.Tensor | None) -> bool:
    """True when a module call may skip the dispatcher: a plain CPU tensor x, not tracing, no
    autograd, no torch function or dispatch mode active (those must see the op)."""
    if type(x) is not torch.Tensor or x.device.type != "cpu":
        return False
    if torch.compiler.is_compiling() or torch.compiler.is_exporting():
        return False
    if torch._C._is_torch_function_mode_enabled() or torch._C._len_torch_dispatch_stack():
        return False
    grad = torch.is_grad_enabled() and (
        x.requires_grad or (bias is not None and bias.requires_grad)
    )
    return not grad


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
    CPU body `kernels.cpu.linear`, which validates (the same kernels, minus the triton_op
    wrapper's ~30 us and the dispatcher's ~5 us per call); else the op."""
    if not _eager_cpu_inference(x, bias):
        return torch.ops.qatpass.w4a16_linear(
            x, qweight, scales, zeros, bias, group_size=group_size
        )
    return _linear_on_cpu(x, qweight, scales, zeros, bias, group_size, _linear_cpu)


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


# --- FP4 (NVFP4, MXFP4): dequantize + linear, in the op --------------------------------------


@functools.cache
def _fp4_scheme(fmt: str) -> Fp4Scheme:
    return Fp4Scheme(fmt)


def _fp4_packed(qweight, scales, global_scale, fmt: str, dtype: torch.dtype) -> PackedWeight:
    """The PackedWeight of an FP4 call's tensors (validated: names the argument at fault)."""
    scheme = _fp4_scheme(fmt)
    for name, t in (("qweight", qweight), ("scales", scales)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"fp4_linear: {name} must be a torch.Tensor, got {type(t).__name__}")
    if qweight.dtype != torch.int32 or qweight.dim() < 2:
        raise TypeError(
            f"fp4_linear: qweight must be int32 [(E,) N, K/8], got {qweight.dtype} "
            f"{tuple(qweight.shape)}"
        )
    *lead, n, k8 = qweight.shape
    k = 8 * k8
    want = (*lead, n, k // scheme.block_size)
    if scales.dtype != scheme.scale_dtype or tuple(scales.shape) != want:
        raise ValueError(
            f"fp4_linear: {fmt} scales must be {scheme.scale_dtype} {want}, got {scales.dtype} "
            f"{tuple(scales.shape)}"
        )
    if scheme.has_global_scale:
        if global_scale is None or tuple(global_scale.shape) != tuple(lead):
            raise ValueError(
                f"fp4_linear: {fmt} needs global_scale of shape {tuple(lead)}, got "
                f"{None if global_scale is None else tuple(global_scale.shape)}"
            )
    elif global_scale is not None:
        raise ValueError(f"fp4_linear: {fmt} has no global_scale")
    shape = torch.Size((*lead, n, k))
    return PackedWeight(qweight, scales, None, shape, len(lead) + 1, dtype, scheme, global_scale)


@torch.library.custom_op("qatpass::fp4_linear", mutates_args=())
def fp4_linear(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    global_scale: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    *,
    fmt: str,
) -> torch.Tensor:
    """x [..., K] @ W.T (+ bias), W an FP4 packed weight [N, K] -> [..., N].

    Equal to `F.linear(x, dequantize(p, x.dtype), bias)` (the scheme's dequantize, every device).
    """
    return _fp4_linear_body(x, qweight, scales, global_scale, bias, fmt)


def _fp4_linear_body(x, qweight, scales, global_scale, bias, fmt: str) -> torch.Tensor:
    p = _fp4_packed(qweight, scales, global_scale, fmt, x.dtype)
    if x.shape[-1] != p.shape[-1]:
        raise ValueError(f"fp4_linear: x has K={x.shape[-1]}, qweight holds K={p.shape[-1]}")
    return _fp4_matmul(x, p, bias)


def _fp4_matmul(x: torch.Tensor, p: PackedWeight, bias: torch.Tensor | None) -> torch.Tensor:
    """x [..., K] @ W.T (+ bias): the CPU FP4 kernel where it applies, the Triton one on CUDA,
    else dequantize + linear."""
    y = None
    x2d = x.reshape(-1, x.shape[-1])
    if x.device.type == "cpu" and p.qweight.dim() == 2:
        y = fp4_native_linear(x2d, p.qweight, p.scales, p.global_scale, p.scheme.name)
    elif x.device.type == "cuda" and p.qweight.dim() == 2:
        from qatpass.kernels.triton.fp4 import fp4_matmul

        y = fp4_matmul(x2d, p.qweight, p.scales, p.global_scale, p.scheme.name)
    if y is None:
        return F.linear(x, dequantize(p, x.dtype), bias)
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype).reshape(*x.shape[:-1], y.shape[-1])


def fp4_linear_eager(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    global_scale: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    *,
    fmt: str,
) -> torch.Tensor:
    """`fp4_linear` as modules call it: in eager mode on CPU without autograd, the op's body
    directly (the same validation and kernels, minus the custom_op dispatch); else the op."""
    if not _eager_cpu_inference(x, bias):
        return torch.ops.qatpass.fp4_linear(x, qweight, scales, global_scale, bias, fmt=fmt)
    return _fp4_linear_body(x, qweight, scales, global_scale, bias, fmt)


@fp4_linear.register_fake
def _fp4_linear_fake(x, qweight, scales, global_scale=None, bias=None, *, fmt):
    return x.new_empty((*x.shape[:-1], qweight.shape[-2]))


@torch.library.custom_op("qatpass::fp4_grouped_linear", mutates_args=())
def fp4_grouped_linear(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    expert_ids: torch.Tensor,
    global_scale: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    *,
    fmt: str,
) -> torch.Tensor:
    """Row t of x [T, K] times expert expert_ids[t]'s FP4 weight [E, N, K] -> [T, N]."""
    p = _fp4_packed(qweight, scales, global_scale, fmt, x.dtype)
    if x.dim() != 2 or x.shape[-1] != p.shape[-1] or qweight.dim() != 3:
        raise ValueError(
            f"fp4_grouped_linear: x must be [T, {p.shape[-1]}] and qweight [E, N, K/8], got "
            f"{tuple(x.shape)} and {tuple(qweight.shape)}"
        )
    out = x.new_zeros((x.shape[0], p.shape[-2]))
    for e in torch.unique(expert_ids).tolist():
        if not 0 <= e < p.shape[0]:
            raise ValueError(f"fp4_grouped_linear: expert id {e} out of range [0, {p.shape[0]})")
        rows = (expert_ids == e).nonzero().squeeze(-1)
        b = None if bias is None else bias[e]
        out.index_copy_(0, rows, _fp4_matmul(x.index_select(0, rows), _expert(p, e), b))
    return out


def _expert(p: PackedWeight, e: int) -> PackedWeight:
    gs = None if p.global_scale is None else p.global_scale[e]
    return PackedWeight(p.qweight[e], p.scales[e], None, p.shape[1:], 1, p.dtype, p.scheme, gs)


@fp4_grouped_linear.register_fake
def _fp4_grouped_fake(x, qweight, scales, expert_ids, global_scale=None, bias=None, *, fmt):
    return x.new_empty((x.shape[0], qweight.shape[-2]))


def _fp4_setup(ctx, inputs, output) -> None:
    ctx.x_dtype = inputs[0].dtype
    ctx.save_for_backward(*inputs[1:])


def _fp4_linear_backward(ctx, grad):
    qweight, scales, global_scale, bias = ctx.saved_tensors
    p = _fp4_packed(qweight, scales, global_scale, ctx.fmt, grad.dtype)
    grad_x = (grad @ dequantize(p, grad.dtype)).to(ctx.x_dtype) if ctx.needs_input_grad[0] else None
    grad_bias = None
    if bias is not None and ctx.needs_input_grad[4]:
        grad_bias = grad.reshape(-1, grad.shape[-1]).sum(0)
    return grad_x, None, None, None, grad_bias


def _fp4_linear_setup(ctx, inputs, keyword_only_inputs, output) -> None:
    ctx.fmt = keyword_only_inputs["fmt"]
    _fp4_setup(ctx, inputs, output)


fp4_linear.register_autograd(_fp4_linear_backward, setup_context=_fp4_linear_setup)


def _fp4_grouped_setup(ctx, inputs, keyword_only_inputs, output) -> None:
    ctx.fmt = keyword_only_inputs["fmt"]
    _fp4_setup(ctx, inputs, output)


def _fp4_grouped_backward(ctx, grad):
    qweight, scales, expert_ids, global_scale, bias = ctx.saved_tensors
    p = _fp4_packed(qweight, scales, global_scale, ctx.fmt, grad.dtype)
    grad_x = None
    if ctx.needs_input_grad[0]:
        grad_x = torch.zeros((grad.shape[0], p.shape[-1]), dtype=ctx.x_dtype, device=grad.device)
        for e in torch.unique(expert_ids).tolist():
            rows = (expert_ids == e).nonzero().squeeze(-1)
            w = dequantize(_expert(p, e), grad.dtype)
            grad_x.index_copy_(0, rows, (grad.index_select(0, rows) @ w).to(ctx.x_dtype))
    grad_bias = None
    if bias is not None and ctx.needs_input_grad[5]:
        grad_bias = torch.zeros(bias.shape, dtype=grad.dtype, device=grad.device)
        grad_bias.index_add_(0, expert_ids.long(), grad)
    return grad_x, None, None, None, None, grad_bias


fp4_grouped_linear.register_autograd(_fp4_grouped_backward, setup_context=_fp4_grouped_setup)


# --- which ops serve a scheme ------------------------------------------------------------------


@dataclass(frozen=True)
class Serving:
    """How a kernel family's packed weights are served: the ops and their tensor arguments.

    linear: the eager module call `linear(x, t0, t1, t2, bias, **kwargs)`; linear_op: the graph
    target with the same arguments; grouped_op: `(x, t0, t1, expert_ids, t2, bias, **kwargs)`;
    tensors: the PackedWeight fields t0, t1, t2.
    """

    linear: Callable[..., torch.Tensor]
    linear_op: Any
    grouped_op: Any
    tensors: tuple[str, str, str]

    def kwargs(self, p: PackedWeight) -> dict[str, Any]:
        if p.scheme.kernel_family == "int4":
            return {"group_size": p.group_size}
        return p.scheme.op_kwargs()


_SERVING = {
    "int4": Serving(
        linear,
        torch.ops.qatpass.w4a16_linear.default,
        torch.ops.qatpass.w4a16_grouped_linear.default,
        ("qweight", "scales", "zeros"),
    ),
    "fp4": Serving(
        fp4_linear_eager,
        torch.ops.qatpass.fp4_linear.default,
        torch.ops.qatpass.fp4_grouped_linear.default,
        ("qweight", "scales", "global_scale"),
    ),
}


def serving(scheme: QuantScheme) -> Serving:
    """The ops that serve weights packed under `scheme`."""
    try:
        return _SERVING[scheme.kernel_family]
    except KeyError:
        raise ValueError(f"no serving ops for scheme {scheme} ({scheme.kernel_family!r})") from None
