"""Fake quant with a straight-through estimator, as torch ops: `qatpass::fake_quantize_int4` and
`qatpass::fake_quantize_fp4` (NVFP4, MXFP4). A scheme names its op (`scheme.fake_quant_op`) and
gives its keyword arguments (`scheme.op_kwargs()`); `fake_quant_call(scheme)` returns both.

The op is CompositeImplicitAutograd, so AOTAutograd decomposes it into plain aten ops that
Inductor fuses into one kernel, and torch.export keeps it visible before decompositions.

Forward returns exactly `dequantize(quantize(w))` (the scheme's formulas); the STE is written as
`dq.detach() + (w - w.detach())`: the added term is +0 in value (so the result is bit-exact) and
the identity in gradient (so d out / d w = I and nothing flows into the scales).
"""

from __future__ import annotations

import torch

from qatpass.scheme import Int4Scheme, QuantScheme, check_dim, fake_quantize_values
from qatpass.scheme_fp4 import Fp4Scheme

__all__ = ["fake_quantize", "fake_quant_call"]

torch.library.define(
    "qatpass::fake_quantize_int4",
    "(Tensor weight, *, int group_size, bool symmetric, int qmin, int qmax, "
    "ScalarType scale_dtype, int dim) -> Tensor",
)


@torch.library.impl("qatpass::fake_quantize_int4", "CompositeImplicitAutograd")
def _fake_quantize_int4(
    weight: torch.Tensor,
    *,
    group_size: int,
    symmetric: bool,
    qmin: int,
    qmax: int,
    scale_dtype: torch.dtype,
    dim: int,
) -> torch.Tensor:
    scheme = Int4Scheme(group_size, symmetric, (qmin, qmax), scale_dtype)
    dq = fake_quantize_values(weight.detach(), scheme, dim)
    return dq + (weight - weight.detach())


torch.library.define("qatpass::fake_quantize_fp4", "(Tensor weight, *, str fmt, int dim) -> Tensor")


@torch.library.impl("qatpass::fake_quantize_fp4", "CompositeImplicitAutograd")
def _fake_quantize_fp4(weight: torch.Tensor, *, fmt: str, dim: int) -> torch.Tensor:
    dq = Fp4Scheme(fmt).fake_quantize_values(weight.detach(), dim)
    return dq + (weight - weight.detach())


def scheme_kwargs(scheme: QuantScheme) -> dict:
    """The fake-quant op's keyword arguments for a scheme, besides `dim` (named, typed)."""
    return scheme.op_kwargs()


def fake_quant_call(scheme: QuantScheme) -> tuple[torch._ops.OpOverload, dict]:
    """(the scheme's fake-quant op, its keyword arguments besides `dim`)."""
    return getattr(torch.ops.qatpass, scheme.fake_quant_op).default, scheme.op_kwargs()


def fake_quantize(
    w: torch.Tensor, scheme: QuantScheme | None = None, dim: int = -1
) -> torch.Tensor:
    """Fake quant of w along its reduction dim, with a straight-through gradient.

    Equal bit for bit to `dequantize(quantize(w, scheme, dim))`; same shape and dtype as w.
    """
    scheme = scheme or Int4Scheme()
    if w.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise TypeError(f"fake_quantize needs a float32/bfloat16/float16 tensor, got {w.dtype}")
    op, kwargs = fake_quant_call(scheme)
    return op(w, dim=check_dim(w, dim), **kwargs)
