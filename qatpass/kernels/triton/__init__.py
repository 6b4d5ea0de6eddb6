"""Fused Triton W4A16 kernels: packed int4 weights, 16-bit activations, fp32 accumulation.

    y = w4a16_matmul(x, qweight, scales, zeros, group_size=32, bias=b)   # x [..., K] -> [..., N]
    y = w4a16_grouped_matmul(x, qweight, scales, expert_ids=ids, group_size=32)   # MoE, [T, N]

Inputs are the canonical packed format of `qatpass.scheme` (qweight int32 [N, K/8], scales
[N, K/G], optional int8 zeros [N, K/G]; experts add a leading E). Every kernel dequantizes in
registers right after the load, with the scheme's exact rounding: fp32 (code - zero) * scale,
then cast to x.dtype, so results equal `x @ qatpass.dequantize(p, dtype=x.dtype).T` up to fp32
summation order. Kernel families, one file each (kernel, configs, launcher):
- `gemv`: M = 1 (decode), CUDA-core reduction, split-K when N alone does not fill the GPU;
- `gemm`: M >= 2, tiled tensor-core `tl.dot`, split-K when the output tiles are few (small M);
- `splitk_reduce`: the deterministic second stage of split-K (fixed order, bias, cast);
- `grouped`: per-row expert weights (MoE batched_mm form).

Launching: every kernel goes through `torch.library.wrap_triton(kernel)[grid](**kwargs)`, so
these launchers can be the body of a `torch.library.triton_op` (traced by torch.compile and
torch.export into a `triton_kernel_wrapper` node), and outside tracing the same call simply runs
the kernel: in plain eager on CUDA, and on CPU tensors under TRITON_INTERPRET=1 (set before
triton is imported). Under the interpreter `wrap_triton` hands back the kernel itself, so it
launches eagerly but cannot be traced: compiled graphs on CPU need the torch path.

Autotuning: `triton.autotune` keyed on N, K, group size, split-K and, for the GEMM, an M bucket
(powers of two up to 256; taken from the size hint, so a dynamic M never guards). It passes
through wrap_triton unchanged. `prune_configs_by` drops configs that do not fit the shape and,
under the interpreter (INTERPRET=True), keeps one config so nothing is benchmarked.

Interpreter quirks handled by constexprs: it truncates fp32 -> bf16 casts, so kernels round to
nearest even on the bits first there (`cast_rne`); its bf16 `tl.dot` is wrong, so the GEMM
upcasts dot operands to fp32 (DOT_FP32, also used for fp32 x so it never drops to TF32). On GPU
bf16/fp16 tiles go to the tensor cores.
"""

from __future__ import annotations

import torch

from qatpass.kernels.triton.common import check_device, check_packed
from qatpass.kernels.triton.gemm import w4a16_gemm
from qatpass.kernels.triton.gemv import w4a16_gemv
from qatpass.kernels.triton.grouped import w4a16_grouped
from qatpass.kernels.triton.plan import GEMV_MAX_M

__all__ = ["GEMV_MAX_M", "w4a16_grouped_matmul", "w4a16_matmul"]


def _contiguous(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.contiguous()


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

    group_size -1 means one group per row (per channel). GEMV for M <= GEMV_MAX_M rows, GEMM above.
    """
    n, k, g = check_packed(x, qweight, scales, zeros, bias, group_size, experts=False)
    lead = x.shape[:-1]
    x2 = x.reshape(-1, k)
    if x2.stride(1) != 1:
        x2 = x2.contiguous()
    m = x2.shape[0]
    if m == 0 or n == 0:
        return torch.empty((*lead, n), device=x.device, dtype=x.dtype)
    launch = w4a16_gemv if m <= GEMV_MAX_M else w4a16_gemm
    out = launch(
        x2,
        qweight.contiguous(),
        scales.contiguous(),
        _contiguous(zeros),
        group_size=g,
        bias=_contiguous(bias),
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
    n, k, g = check_packed(x, qweight, scales, zeros, bias, group_size, experts=True)
    if not isinstance(expert_ids, torch.Tensor):
        raise TypeError(f"expert_ids must be a torch.Tensor, got {type(expert_ids).__name__}")
    if expert_ids.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"expert_ids must be int32 or int64, got {expert_ids.dtype}")
    t = x.shape[0]
    if tuple(expert_ids.shape) != (t,):
        raise ValueError(
            f"expert_ids must have shape ({t},) (one per row of x), got {tuple(expert_ids.shape)}"
        )
    check_device(x, {"expert_ids": expert_ids})
    num_experts = qweight.shape[0]
    # Only a plain CPU tensor can be checked without a device sync or a traced value.
    if type(expert_ids) is torch.Tensor and expert_ids.device.type == "cpu" and t > 0:
        lo, hi = int(expert_ids.min()), int(expert_ids.max())
        if lo < 0 or hi >= num_experts:
            raise ValueError(
                f"expert_ids must lie in [0, {num_experts}) (qweight has {num_experts} experts), "
                f"got values in [{lo}, {hi}]"
            )
    if t == 0 or n == 0:
        return torch.empty((t, n), device=x.device, dtype=x.dtype)
    return w4a16_grouped(
        x,
        qweight.contiguous(),
        scales.contiguous(),
        _contiguous(zeros),
        expert_ids=expert_ids.contiguous(),
        group_size=g,
        bias=_contiguous(bias),
    )
