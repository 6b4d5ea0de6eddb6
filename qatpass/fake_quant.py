"""`qatpass::fake_quantize_int4`: INT4 fake quant with a straight-through estimator, as a torch op.

The op is CompositeImplicitAutograd, so AOTAutograd decomposes it into plain aten ops that
Inductor fuses into one kernel, and torch.export keeps it visible before decompositions.

Forward returns exactly `dequantize(quantize(w))` (the scheme's formulas); the STE is written as
`dq.detach() + (w - w.detach())`: the added term is +0 in value (so the result is bit-exact) and
the identity in gradient (so d out / d w = I and nothing flows into the scales).
"""

from __future__ import annotations

import torch

from qatpass.scheme import Int4Scheme, check_dim, fake_quantize_values

__all__ = ["fake_quantize"]

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


def scheme_kwargs(scheme: Int4Scheme) -> dict:
    """The op's keyword arguments for a scheme (named, typed; see the schema above)."""
    return {
        "group_size": scheme.group_size,
        "symmetric": scheme.symmetric,
        "qmin": scheme.qmin,
        "qmax": scheme.qmax,
        "scale_dtype": scheme.scale_dtype,
    }


def fake_quantize(w: torch.Tensor, scheme: Int4Scheme | None = None, dim: int = -1) -> torch.Tensor:
    """INT4 fake quant of w along its reduction dim, with a straight-through gradient.

    Equal bit for bit to `dequantize(quantize(w, scheme, dim))`; same shape and dtype as w.
    """
    scheme = scheme or Int4Scheme()
    if w.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise TypeError(f"fake_quantize needs a float32/bfloat16/float16 tensor, got {w.dtype}")
    return torch.ops.qatpass.fake_quantize_int4(w, dim=check_dim(w, dim), **scheme_kwargs(scheme))
