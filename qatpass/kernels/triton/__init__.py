"""Fused Triton W4A16 kernels: packed int4 weights, 16-bit activations, fp32 accumulation.

    y = w4a16_matmul(x, qweight, scales, zeros, group_size=32, bias=b)   # x [..., K] -> [..., N]
    y = w4a16_grouped_matmul(x, qweight, scales, expert_ids=ids, group_size=32)   # MoE, [T, N]

Inputs are the canonical packed format of `qatpass.scheme` (qweight int32 [N, K/8], scales
[N, K/G], optional int8 zeros [N, K/G]; experts add a leading E). Every kernel dequantizes in
registers right after the load, with the scheme's exact rounding: (code - zero) * scale rounded
once to x.dtype, so results equal `x @ qatpass.dequantize(p, dtype=x.dtype).T` up to fp32
summation order. Kernel families, one file each (kernel, launcher):
- `gemv`: decode, M = 1 and, on the tensor cores, M <= plan.GEMV_MAX_M (16: batched decode,
  x rows in the mma's B columns): int32 word tiles dequantized by packed 16-bit PTX into
  mma.sync (CUDA cores for fp32 x or scales, M = 1), split-K sized from the real tile;
- `gemm`: the other M >= 2, tiled tensor-core `tl.dot`, split-K when the output tiles are few;
- `dequant_matmul`: large M (plan.DEQUANT_MATMUL_MIN_M), the weight dequantized once, cuBLAS;
- `plan`: the launch plans (kernel, tile, split-K, grid) from the run-time shapes;
- `splitk_reduce`: the deterministic second stage of split-K (fixed order, bias, cast);
- `grouped`: per-row expert weights (MoE batched_mm form, decode);
- `grouped_gemm`: MoE prefill, rows sorted by expert, tensor-core tiles per expert (the plan
  picks it from the number of routed rows: `plan.plan_grouped`);
- `fp4`: NVFP4 / MXFP4 weights (`fp4.fp4_matmul`, called by `qatpass::fp4_linear` on CUDA):
  its GEMV and GEMM on the same plans, loads and split-K reduce, one FP4 decode.

Launching (`common.launch`): `kernel[grid](**kwargs)`, through `wrap_triton` while tracing (the
launchers themselves stay traceable); on CPU tensors the kernels run under TRITON_INTERPRET=1
(set before triton is imported).

Launch choices: `plan` (pure functions of the real M, N, K, group and SM count; no autotuning,
so a CUDA-graph capture never benchmarks). They must see the run-time M, not a trace-time size
hint: when the call is traced (torch.compile, make_fx, the body of the `qatpass::w4a16_linear`
triton_op under Inductor), these functions emit the opaque op `qatpass::w4a16_matmul_triton`
(and its grouped twin) instead of the kernels; at run time that op's body plans from the real
shapes and launches. In eager mode they validate once and launch directly.

Interpreter quirks handled by constexprs: it truncates fp32 -> bf16 casts, so kernels round to
nearest even on the bits first there (`cast_rne`); its bf16 `tl.dot` is wrong, so the GEMM
upcasts dot operands to fp32 (DOT_FP32, also used for fp32 x so it never drops to TF32). On GPU
bf16/fp16 tiles go to the tensor cores.
"""

from __future__ import annotations

import torch

from qatpass.kernels.triton.common import check_device, check_packed, num_sms
from qatpass.kernels.triton.dequant_matmul import w4a16_dequant_matmul
from qatpass.kernels.triton.gemm import w4a16_gemm
from qatpass.kernels.triton.gemv import gemv_mma, w4a16_gemv
from qatpass.kernels.triton.grouped import w4a16_grouped
from qatpass.kernels.triton.grouped_gemm import w4a16_grouped_gemm
from qatpass.kernels.triton.plan import GEMV_MAX_M, plan_grouped, plan_linear
from qatpass.packed_args import check_grouped_args, check_packed_args

__all__ = ["GEMV_MAX_M", "plan_linear", "w4a16_grouped_matmul", "w4a16_matmul"]


def _contiguous(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.contiguous()


def _traced(x: torch.Tensor) -> bool:
    """Whether this call is being traced (its shapes may be symbolic or only hints)."""
    from torch.fx.experimental.proxy_tensor import get_proxy_mode

    if not isinstance(x, torch.Tensor):
        return False  # validation names the bad argument
    traced = torch.compiler.is_compiling() or get_proxy_mode() is not None
    return traced or type(x) is not torch.Tensor


def w4a16_matmul(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor | None = None,
    *,
    group_size: int,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """x [..., K] @ W.T (+ bias) with W packed: qweight int32 [N, K/8], scales [N, K/G],
    zeros int8 [N, K/G] or None, bias [N] or None. Returns [..., N] in x.dtype.

    group_size -1 means one group per row (per channel). The kernel, tile and split-K follow
    `plan_linear` on the run-time M (GEMV up to GEMV_MAX_M rows, GEMM above, dequantize +
    cuBLAS from DEQUANT_MATMUL_MIN_M)."""
    if _traced(x):
        return torch.ops.qatpass.w4a16_matmul_triton(x, qweight, scales, zeros, bias, group_size)
    n, k, g = check_packed(x, qweight, scales, zeros, bias, group_size, experts=False)
    return _matmul(x, qweight, scales, zeros, bias, n, k, g)


_LAUNCHERS = {"gemv": w4a16_gemv, "gemm": w4a16_gemm, "dequant_matmul": w4a16_dequant_matmul}


def _matmul(x, qweight, scales, zeros, bias, n: int, k: int, g: int) -> torch.Tensor:
    """The launch, on validated arguments."""
    lead = x.shape[:-1]
    x2 = x.reshape(-1, k)
    if x2.stride(1) != 1:
        x2 = x2.contiguous()
    m = x2.shape[0]
    if m == 0 or n == 0:
        return torch.empty((*lead, n), device=x.device, dtype=x.dtype)
    plan = plan_linear(m, n, k, g, num_sms(x.device), gemv_mma(x2, scales))
    out = _LAUNCHERS[plan.kernel](
        x2,
        qweight.contiguous(),
        scales.contiguous(),
        _contiguous(zeros),
        group_size=g,
        bias=_contiguous(bias),
        plan=plan,
    )
    return out.reshape(*lead, n)


def w4a16_grouped_matmul(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor | None = None,
    *,
    expert_ids: torch.Tensor,
    group_size: int,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """Row t of x [T, K] times expert expert_ids[t]'s packed weight: qweight int32 [E, N, K/8],
    scales [E, N, K/G], zeros int8 [E, N, K/G] or None, bias [E, N] or None -> [T, N] in x.dtype.

    Rows need not be sorted by expert. Ids are range-checked here for real CPU tensors; on GPU
    (no host sync) a row with an id outside [0, E) comes out NaN instead of reading garbage.
    """
    if _traced(x):
        return torch.ops.qatpass.w4a16_grouped_matmul_triton(
            x, qweight, scales, zeros, bias, expert_ids, group_size
        )
    n, k, g = check_grouped_args(x, qweight, scales, zeros, bias, expert_ids, group_size)
    check_device(x, {})
    return _grouped(x, qweight, scales, zeros, bias, expert_ids, n, g)


def _grouped(x, qweight, scales, zeros, bias, expert_ids, n: int, g: int) -> torch.Tensor:
    t = x.shape[0]
    num_experts = qweight.shape[0]
    # Only a plain CPU tensor can be checked without a device sync.
    if expert_ids.device.type == "cpu" and t > 0:
        lo, hi = int(expert_ids.min()), int(expert_ids.max())
        if lo < 0 or hi >= num_experts:
            raise ValueError(
                f"expert_ids must lie in [0, {num_experts}) (qweight has {num_experts} experts), "
                f"got values in [{lo}, {hi}]"
            )
    if t == 0 or n == 0:
        return torch.empty((t, n), device=x.device, dtype=x.dtype)
    plan = plan_grouped(t, n, x.shape[1], g, num_experts)
    args = (x, qweight.contiguous(), scales.contiguous(), _contiguous(zeros))
    kwargs = dict(expert_ids=expert_ids.contiguous(), group_size=g, bias=_contiguous(bias))
    if plan.kernel == "grouped_gemm":
        return w4a16_grouped_gemm(*args, **kwargs, plan=plan)
    return w4a16_grouped(*args, **kwargs)


# --- the opaque ops that traced graphs call: planned and launched at run time ---------------

_LIB = torch.library.Library("qatpass", "FRAGMENT")
_LIB.define(
    "w4a16_matmul_triton(Tensor x, Tensor qweight, Tensor scales, Tensor? zeros, Tensor? bias, "
    "int group_size) -> Tensor"
)
_LIB.define(
    "w4a16_grouped_matmul_triton(Tensor x, Tensor qweight, Tensor scales, Tensor? zeros, "
    "Tensor? bias, Tensor expert_ids, int group_size) -> Tensor"
)


def _matmul_op(x, qweight, scales, zeros, bias, group_size: int) -> torch.Tensor:
    n, k, g = check_packed(x, qweight, scales, zeros, bias, group_size, experts=False)
    return _matmul(x, qweight, scales, zeros, bias, n, k, g)


def _grouped_op(x, qweight, scales, zeros, bias, expert_ids, group_size: int) -> torch.Tensor:
    n, _, g = check_grouped_args(x, qweight, scales, zeros, bias, expert_ids, group_size)
    check_device(x, {})
    return _grouped(x, qweight, scales, zeros, bias, expert_ids, n, g)


for _key in ("CUDA", "CPU"):  # CPU: the Triton interpreter (check_device refuses otherwise)
    _LIB.impl("w4a16_matmul_triton", _matmul_op, _key)
    _LIB.impl("w4a16_grouped_matmul_triton", _grouped_op, _key)


@torch.library.register_fake("qatpass::w4a16_matmul_triton")
def _matmul_fake(x, qweight, scales, zeros, bias, group_size):
    check_packed_args(x, qweight, scales, zeros, bias, group_size, experts=False)
    return x.new_empty((*x.shape[:-1], qweight.shape[-2]))


@torch.library.register_fake("qatpass::w4a16_grouped_matmul_triton")
def _grouped_fake(x, qweight, scales, zeros, bias, expert_ids, group_size):
    check_grouped_args(x, qweight, scales, zeros, bias, expert_ids, group_size)
    return x.new_empty((x.shape[0], qweight.shape[-2]))
