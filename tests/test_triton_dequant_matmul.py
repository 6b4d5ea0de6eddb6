"""Large M: the weight dequantized once (exactly qatpass.dequantize) and torch's matmul, in the
Triton interpreter; the plan switches to it at DEQUANT_MATMUL_MIN_M rows."""

from __future__ import annotations

import os

import pytest
import torch

import qatpass
from qatpass.kernels.triton import dequant_matmul, plan, w4a16_matmul

from conftest import ACCUM, EXACT

pytestmark = pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available(),
    reason="needs a CUDA device or TRITON_INTERPRET=1",
)
DEVICE = "cpu" if os.environ.get("TRITON_INTERPRET") == "1" else "cuda"


def _packed(shape, group_size, symmetric, scale_dtype=torch.bfloat16):
    scheme = qatpass.Int4Scheme(
        group_size=group_size,
        symmetric=symmetric,
        qrange=(-7, 7) if symmetric else (-8, 7),
        scale_dtype=scale_dtype,
    )
    p = qatpass.quantize(torch.randn(shape) + (0.0 if symmetric else 0.5), scheme)
    return p, tuple(None if t is None else t.to(DEVICE) for t in (p.qweight, p.scales, p.zeros))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize(("n", "k", "group_size", "symmetric"),
                         [(40, 192, 32, False), (33, 256, 128, True), (8, 64, 64, False)])  # fmt: skip
def test_dequantize_weight_is_exactly_the_reference(dtype, n, k, group_size, symmetric):
    p, (qweight, scales, zeros) = _packed((n, k), group_size, symmetric)
    for chosen in (plan.DequantPlan(), plan.plan_dequant(group_size)):  # gathered, per row
        w = dequant_matmul.dequantize_weight(
            qweight, scales, zeros, group_size=group_size, dtype=dtype, plan=chosen
        )
        assert w.dtype == dtype and w.shape == (n, k)
        torch.testing.assert_close(w.cpu(), qatpass.dequantize(p, dtype=dtype), **EXACT)


@pytest.mark.parametrize("with_bias", [False, True])
def test_large_m_takes_dequantize_and_matmul(with_bias):
    n, k, m = 24, 128, plan.DEQUANT_MATMUL_MIN_M
    assert plan.plan_linear(m, 4096, 4096, 32, 132).kernel == "dequant_matmul"
    assert plan.plan_linear(m - 1, 4096, 4096, 32, 132).kernel == "gemm"
    p, (qweight, scales, zeros) = _packed((n, k), 32, False)
    x = torch.randn(m, k, dtype=torch.bfloat16, device=DEVICE)
    bias = torch.randn(n, dtype=torch.bfloat16, device=DEVICE) if with_bias else None
    y = w4a16_matmul(x, qweight, scales, zeros, group_size=32, bias=bias)
    ref = x.float() @ qatpass.dequantize(p, dtype=x.dtype).float().to(DEVICE).T
    if with_bias:
        ref = ref + bias.float()
    assert y.shape == (m, n) and y.dtype == x.dtype
    torch.testing.assert_close(y.float(), ref, **ACCUM[torch.bfloat16])
