"""Validation of a W4A16 call's packed arguments, shared by the ops and the Triton launchers.

One place for the canonical format's rules (see `qatpass.scheme`): x [..., K] (experts: [T, K]),
qweight int32 [(E,) N, K/8], scales [(E,) N, K/G] in a float dtype, zeros int8 like scales or
None, bias [(E,) N] or None, all on x's device. Errors name the argument and what was expected.
"""

from __future__ import annotations

import torch

__all__ = [
    "ACTIVATION_DTYPES",
    "SCALE_DTYPES",
    "NIBBLES_PER_WORD",
    "check_grouped_args",
    "check_packed_args",
]

ACTIVATION_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
SCALE_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
NIBBLES_PER_WORD = 8


def check_packed_args(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor | None,
    bias: torch.Tensor | None,
    group_size: int,
    experts: bool,
) -> tuple[int, int, int]:
    """Validate a W4A16 call; returns (N, K, group size). `experts`: weights carry a leading E."""
    for name, t in (("x", x), ("qweight", qweight), ("scales", scales)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if x.dtype not in ACTIVATION_DTYPES:
        raise TypeError(f"x must be float16, bfloat16 or float32, got {x.dtype}")
    if qweight.dtype != torch.int32:
        raise TypeError(f"qweight must be int32 (8 packed int4 per element), got {qweight.dtype}")
    if scales.dtype not in SCALE_DTYPES:
        raise TypeError(f"scales must be float16, bfloat16 or float32, got {scales.dtype}")
    if zeros is not None and zeros.dtype != torch.int8:
        raise TypeError(f"zeros must be int8, got {zeros.dtype}")
    if bias is not None and bias.dtype not in SCALE_DTYPES:
        raise TypeError(f"bias must be float16, bfloat16 or float32, got {bias.dtype}")
    if isinstance(group_size, bool) or not isinstance(group_size, int):
        raise TypeError(f"group_size must be an int, got {type(group_size).__name__}")

    wdim = 3 if experts else 2
    layout = "[E, N, K/8]" if experts else "[N, K/8]"
    if qweight.dim() != wdim:
        raise ValueError(f"qweight must be {layout}, got shape {tuple(qweight.shape)}")
    if x.dim() < 1 or (experts and x.dim() != 2):
        raise ValueError(f"x must be {'[T, K]' if experts else '[..., K]'}, got {tuple(x.shape)}")
    k = x.shape[-1]
    n = qweight.shape[-2]
    if k == 0 or k != NIBBLES_PER_WORD * qweight.shape[-1]:
        raise ValueError(
            f"x has K={k} but qweight {tuple(qweight.shape)} holds K={8 * qweight.shape[-1]} "
            "(K must be positive and equal 8 * qweight.shape[-1])"
        )
    if group_size != -1 and group_size <= 0:
        raise ValueError(f"group_size must be positive or -1 (per channel), got {group_size}")
    g = k if group_size == -1 else group_size
    if k % g:
        raise ValueError(f"K={k} is not divisible by group_size {g}")
    if g % NIBBLES_PER_WORD:
        raise ValueError(
            f"group_size {g} must be a multiple of 8 (packed groups are whole int32 words)"
        )
    lead = tuple(qweight.shape[:-2])
    want = (*lead, n, k // g)
    if tuple(scales.shape) != want:
        raise ValueError(
            f"scales must have shape {want} ([..., N, K/group_size]), got {tuple(scales.shape)}"
        )
    if zeros is not None and tuple(zeros.shape) != want:
        raise ValueError(f"zeros must have shape {want} like scales, got {tuple(zeros.shape)}")
    if bias is not None and tuple(bias.shape) != (*lead, n):
        raise ValueError(f"bias must have shape {(*lead, n)}, got {tuple(bias.shape)}")
    for name, t in (("qweight", qweight), ("scales", scales), ("zeros", zeros), ("bias", bias)):
        if t is not None and t.device != x.device:
            raise ValueError(f"{name} is on {t.device} but x is on {x.device}")
    return n, k, g


def check_grouped_args(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor | None,
    bias: torch.Tensor | None,
    expert_ids: torch.Tensor,
    group_size: int,
) -> tuple[int, int, int]:
    """`check_packed_args` for the grouped (MoE) call, plus expert_ids [T] int32/int64 on x's
    device (their values are range-checked by the kernels, which can do so without a sync)."""
    n, k, g = check_packed_args(x, qweight, scales, zeros, bias, group_size, experts=True)
    if not isinstance(expert_ids, torch.Tensor):
        raise TypeError(f"expert_ids must be a torch.Tensor, got {type(expert_ids).__name__}")
    if expert_ids.dtype not in (torch.int32, torch.int64) or expert_ids.dim() != 1:
        raise TypeError(
            f"expert_ids must be a 1-d int32/int64 tensor, got {expert_ids.dtype} "
            f"{tuple(expert_ids.shape)}"
        )
    if expert_ids.shape[0] != x.shape[0]:
        raise ValueError(f"{expert_ids.shape[0]} expert ids for {x.shape[0]} rows of x")
    if expert_ids.device != x.device:
        raise ValueError(f"expert_ids is on {expert_ids.device} but x is on {x.device}")
    return n, k, g
