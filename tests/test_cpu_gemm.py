"""The CPU GEMM on decoded weight strips (`kernels.cpu.gemm`, qp_w4a16_gemm_bf16) against the
scheme: each weight it applies is the fp32 (code - zero) * scale (times 1.0 and rounded once to
bf16 it is dequantize(p, bf16) bit for bit), its sums are fp32 in a fixed order."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from qatpass.kernels.cpu import gemm
from qatpass.kernels.cpu import linear as cpu_linear
from qatpass.kernels.cpu.gemm import gemm_linear
from qatpass.kernels.cpu.native import library
from qatpass.scheme import Int4Scheme, dequantize, quantize

from conftest import needs_native

pytestmark = [
    needs_native,
    pytest.mark.skipif(not gemm.gemm_supported(), reason="the CPU lacks AVX-512 VBMI"),
]


def _scheme(group_size, symmetric, scale_dtype=torch.bfloat16):
    qrange = (-7, 7) if symmetric else (-8, 7)
    return Int4Scheme(group_size=group_size, symmetric=symmetric, qrange=qrange,
                      scale_dtype=scale_dtype)  # fmt: skip


def _packed(n, k, group_size, symmetric, scale_dtype=torch.bfloat16):
    w = torch.randn(n, k) + (0.0 if symmetric else 0.7)  # off-centre: zeros matter
    return quantize(w, _scheme(group_size, symmetric, scale_dtype))


def _gemm(x, p, bias=None):
    return gemm_linear(library(), x, p.qweight, p.scales, p.zeros, bias, p.group_size)


def _check_gemm(y, x, p, bias):
    """x @ W.T (+ bias), W the scheme's fp32 dequantize, up to fp32 summation order and one final
    bf16 rounding (the bound of tests/test_cpu_kernel.py's native checks)."""
    w = dequantize(p, torch.float64)
    ref = x.double() @ w.t()
    if bias is not None:
        ref = ref + bias.double()
    magnitude = x.double().abs() @ w.abs().t()
    err = (y.double() - ref).abs()
    bound = ref.abs() * 2**-8 + magnitude * 2**-20
    assert y.dtype == torch.bfloat16 and bool((err <= bound).all()), float((err - bound).max())


@pytest.mark.parametrize(
    ("n", "k", "group_size"),  # K past a 256 chunk or a 128 block (32 / 64 / 96 over), N % 16
    [(48, 256, 32), (40, 384, 128), (17, 96, 32), (33, 160, -1), (7, 544, 32), (70, 768, 256)],
)
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("scale_dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_the_decode_is_bit_equal_to_the_schemes_bf16_dequantize(n, k, group_size, symmetric,
                                                                scale_dtype):  # fmt: skip
    """x = the identity: each output is one weight, fp32 code x scale, rounded once to bf16."""
    p = _packed(n, k, group_size, symmetric, scale_dtype)
    y = _gemm(torch.eye(k, dtype=torch.bfloat16), p)
    assert torch.equal(y, dequantize(p, torch.bfloat16).t())


@pytest.mark.parametrize("m", [16, 17, 24, 25, 40, 100])  # strips of 12 rows, split evenly
@pytest.mark.parametrize(("n", "k", "group_size"), [(130, 256, 32), (20, 1056, -1), (64, 640, 128)])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("has_bias", [False, True])
def test_gemm_matches_the_scheme(m, n, k, group_size, symmetric, has_bias):
    p = _packed(n, k, group_size, symmetric)
    x = torch.randn(m, k).bfloat16()
    bias = torch.randn(n).bfloat16() if has_bias else None
    _check_gemm(_gemm(x, p, bias), x, p, bias)


def test_gemm_reads_strided_rows_of_x():
    """Rows of x at any stride, including an odd one (rows start at any even address)."""
    p = _packed(40, 256, 32, True)
    wide = torch.randn(20, 257).bfloat16()
    x = wide[:, 1:]  # row stride 257, data starts one element in
    assert x.stride() == (257, 1)
    assert torch.equal(_gemm(x, p), _gemm(x.contiguous(), p))


def test_gemm_refuses_fp32_x():
    p = _packed(16, 128, 32, True)
    with pytest.raises(ValueError, match="bfloat16"):
        _gemm(torch.randn(16, 128), p)


@pytest.mark.parametrize("m", [16, 29, 64])
@pytest.mark.parametrize("symmetric", [True, False])
def test_gemm_is_bit_identical_on_1_and_2_threads(m, symmetric):
    p = _packed(200, 640, 32, symmetric)  # 4 blocks of 64 weight rows, the last one short
    x = torch.randn(m, 640).bfloat16()
    threads = torch.get_num_threads()
    out = []
    try:
        for t in (1, 2):
            torch.set_num_threads(t)
            out.append(_gemm(x, p))
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(out[0], out[1])


def test_linear_picks_by_m_at_run_time(monkeypatch):
    """kernels.cpu.linear: bf16 x from GEMM_MIN_M rows takes the GEMM, fewer the native kernel
    (exact fp32 weights); fp32 x never takes it."""
    assert gemm.GEMM_MIN_M is not None
    p = _packed(32, 256, 32, True)
    lo, hi = gemm.GEMM_MIN_M - 1, gemm.GEMM_MIN_M
    assert not gemm.use_gemm(torch.zeros(lo, 256).bfloat16())
    assert gemm.use_gemm(torch.zeros(hi, 256).bfloat16())
    assert not gemm.use_gemm(torch.zeros(hi, 256))
    x = torch.randn(hi, 256).bfloat16()
    y = cpu_linear(x, p.qweight, p.scales, p.zeros, None, group_size=p.group_size)
    assert torch.equal(y, _gemm(x, p))
    monkeypatch.setattr(gemm, "GEMM_MIN_M", None)
    assert not gemm.use_gemm(x)


@settings(max_examples=25, deadline=None)
@given(
    m=st.integers(1, 60),
    n=st.integers(1, 140),
    blocks=st.integers(1, 12),
    log_group=st.integers(5, 8),
    symmetric=st.booleans(),
    scale_dtype=st.sampled_from([torch.bfloat16, torch.float16, torch.float32]),
    seed=st.integers(0, 2**16),
)
def test_gemm_every_shape(m, n, blocks, log_group, symmetric, scale_dtype, seed):
    torch.manual_seed(seed)
    group = 2**log_group
    k = 32 * blocks * max(1, group // 32)
    p = quantize(torch.randn(n, k), _scheme(group, symmetric, scale_dtype))
    x = torch.randn(m, k).bfloat16()
    _check_gemm(_gemm(x, p), x, p, None)
