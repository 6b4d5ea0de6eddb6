"""Second stage of split-K: sum fp32 partials in a fixed order, add bias, cast, in one pass.

A fixed summation order (split 0, 1, ...) makes split-K results deterministic, unlike fp32
atomics, and fusing bias and the cast keeps the reduction a single extra launch.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from qatpass.kernels.triton.common import cast_rne, interpreting, launch, num_sms

REDUCE_BLOCK = 1024
REDUCE_MIN_BLOCK = 128


def reduce_block(mn: int, sms: int) -> int:
    """Elements per program: REDUCE_BLOCK, narrowed (to REDUCE_MIN_BLOCK) until the grid
    covers the SMs (a decode GEMV's N = 4096 outputs would otherwise be 4 programs, each
    reading SPLIT_K partials serially)."""
    block = REDUCE_BLOCK
    while block > REDUCE_MIN_BLOCK and -(-mn // block) < sms:
        block //= 2
    return block


@triton.jit
def splitk_reduce_kernel(
    # tensors
    partials_ptr,  # fp32 [SPLIT_K, M, N], contiguous
    bias_ptr,  # [N] or None
    out_ptr,  # [M, N] contiguous, output dtype
    # sizes
    MN,
    N,
    # meta
    SPLIT_K: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    INTERPRET: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """out = sum_s partials[s] (+ bias) over a flat block of M*N; grid (M*N / BLOCK,)."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < MN
    acc = tl.load(partials_ptr + offs, mask=mask, other=0.0)
    for s in tl.static_range(1, SPLIT_K):
        acc += tl.load(partials_ptr + s * MN + offs, mask=mask, other=0.0)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs % N, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + offs, cast_rne(acc, out_ptr.dtype.element_ty, INTERPRET), mask=mask)


def splitk_output(
    x: torch.Tensor, m: int, n: int, split_k: int, dtype: torch.dtype | None = None
) -> tuple[torch.Tensor, int]:
    """The first stage's output and its split stride: [M, N] in `dtype` (default x.dtype) when
    there is one split, else fp32 partials [SPLIT_K, M, N] for `splitk_reduce`."""
    if split_k == 1:
        return torch.empty((m, n), device=x.device, dtype=dtype or x.dtype), 0
    return torch.empty((split_k, m, n), device=x.device, dtype=torch.float32), m * n


def splitk_reduce(
    partials: torch.Tensor, *, bias: torch.Tensor | None, dtype: torch.dtype
) -> torch.Tensor:
    """[SPLIT_K, M, N] fp32 partials -> [M, N] in `dtype`, bias [N] added in fp32."""
    split_k, m, n = partials.shape
    out = torch.empty((m, n), device=partials.device, dtype=dtype)
    mn = m * n
    block = reduce_block(mn, num_sms(partials.device))
    launch(
        splitk_reduce_kernel,
        (-(-mn // block),),
        dict(
            partials_ptr=partials,
            bias_ptr=bias,
            out_ptr=out,
            MN=mn,
            N=n,
            SPLIT_K=split_k,
            HAS_BIAS=bias is not None,
            INTERPRET=interpreting(),
            BLOCK=block,
            num_warps=4,
        ),
    )
    return out
