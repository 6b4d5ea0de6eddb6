"""The scheme's formulas: validation, packing, fake == dequantize(quantize), edge values."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import qatpass
from qatpass.scheme import (
    Int4Scheme,
    check_quantizable,
    dequantize,
    fake_quantize_values,
    pack_int4,
    quantize,
    round_to_dtype,
    unpack_int4,
)

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
SCHEMES = [
    Int4Scheme(),
    Int4Scheme(group_size=64, qrange=(-8, 7)),
    Int4Scheme(group_size=128, symmetric=False, qrange=(-8, 7)),
    Int4Scheme(group_size=-1, symmetric=False),
    Int4Scheme(group_size=32, scale_dtype=torch.float16),
    Int4Scheme(group_size=256, scale_dtype=torch.float32),
]


# --- validation -------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"group_size": 0}, "group_size"),
        ({"group_size": 48}, "power of two"),
        ({"group_size": 4}, "power of two"),
        ({"group_size": 32.0}, "must be an int"),
        ({"qrange": (-8, 8)}, "qrange"),
        ({"qrange": (0, 15)}, "qrange"),
        ({"scale_dtype": torch.int8}, "scale_dtype"),
    ],
)
def test_scheme_rejects_bad_fields(kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        Int4Scheme(**kwargs)


def test_scheme_round_trips_through_dict():
    for s in SCHEMES:
        assert Int4Scheme.from_dict(s.to_dict()) == s
    assert Int4Scheme(qrange=[-8, 7]).qrange == (
        -8,
        7,
    )  # lists accepted, stored as tuple (hashable)
    assert hash(Int4Scheme()) == hash(Int4Scheme())


def test_check_quantizable_reasons():
    s = Int4Scheme(group_size=32)
    assert check_quantizable((64, 96), 1, s) is None
    assert "not divisible by group_size 32" in check_quantizable((64, 80), 1, s)
    assert "not a matmul weight" in check_quantizable((64,), 0, s)
    assert "divisible by 8" in check_quantizable((4, 12), 1, Int4Scheme(group_size=-1))


# --- packing ----------------------------------------------------------------------------------
def test_pack_layout_is_low_nibble_first():
    codes = torch.tensor([[-8, -7, 0, 1, 2, 3, 6, 7]], dtype=torch.int8)
    packed = pack_int4(codes)
    assert packed.dtype == torch.int32 and packed.shape == (1, 1)
    as_bytes = packed.view(torch.uint8).tolist()[0]
    # stored nibble = code + 8; byte = even k | odd k << 4
    assert as_bytes == [0 | (1 << 4), 8 | (9 << 4), 10 | (11 << 4), 14 | (15 << 4)]
    assert torch.equal(unpack_int4(packed), codes)


@settings(max_examples=40, deadline=None)
@given(
    lead=st.lists(st.integers(1, 3), max_size=2),
    k8=st.integers(1, 12),
    seed=st.integers(0, 2**31 - 1),
)
def test_pack_unpack_round_trip(lead, k8, seed):
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(-8, 8, (*lead, 8 * k8), generator=g, dtype=torch.int8)
    assert torch.equal(unpack_int4(pack_int4(codes)), codes)


def test_pack_accepts_odd_strides_on_size_one_dims():
    codes = torch.randint(-8, 8, (16, 1), dtype=torch.int8).t()  # [1, 16], stride (1, 1)
    assert torch.equal(unpack_int4(pack_int4(codes)), codes)
    assert torch.equal(unpack_int4(pack_int4(codes)[:, :1].t().t()), codes[:, :8])


def test_unpack_rejects_wrong_dtype():
    with pytest.raises(TypeError, match="int32"):
        unpack_int4(torch.zeros(2, 2, dtype=torch.uint8))


# --- fake quant == dequantize(quantize) ---------------------------------------------------------
@settings(max_examples=60, deadline=None)
@given(
    scheme=st.sampled_from(SCHEMES),
    dtype=st.sampled_from(DTYPES),
    n=st.integers(1, 9),
    groups=st.integers(1, 3),
    experts=st.sampled_from([None, 1, 3]),
    log_scale=st.floats(-20, 20),
    seed=st.integers(0, 2**31 - 1),
)
def test_fake_quant_equals_dequantize_quantize(scheme, dtype, n, groups, experts, log_scale, seed):
    k = (scheme.group_size if scheme.group_size > 0 else 24) * groups
    shape = (n, k) if experts is None else (experts, n, k)
    g = torch.Generator().manual_seed(seed)
    w = (torch.randn(shape, generator=g) * 2.0**log_scale).to(dtype)
    if not torch.isfinite(w).all():
        return  # fp16 overflow of the random draw itself, not the scheme's concern
    fq = qatpass.fake_quantize(w, scheme)
    assert torch.isfinite(fq).all()
    try:
        p = quantize(w, scheme)
    except ValueError as e:
        # fp16 scales saturate at 65504 (|w| > 7 * 65504): quantize refuses, fake quant clips
        assert scheme.scale_dtype == torch.float16 and "scales represent" in str(e)
        return
    dq = dequantize(p)
    assert dq.dtype == dtype and dq.shape == w.shape
    assert torch.equal(fq, dq)
    # error bound: |w - dq| <= scale / 2, up to the scale's own bf16 rounding (7.5 x 2^-8) and the rounding
    # of dq to the weight dtype; (-8, 7) clips +amax from 7.5 to 7 (and -amax from -8 to -7 where
    # -8 * scale overflows the weight dtype): the same half step
    scales = p.scales.float().repeat_interleave(p.group_size, dim=-1)
    # an ulp of dq in the weight dtype, relative for normals, the fixed subnormal step below them
    info = torch.finfo(dtype)
    ulp = dq.float().abs() * info.eps + info.smallest_normal * info.eps
    if scheme.symmetric:
        assert ((w.float() - dq.float()).abs() <= scales * 0.532 + ulp).all()
    # codes in range, scales positive and finite
    codes = unpack_int4(p.qweight)
    assert codes.min() >= scheme.qmin and codes.max() <= scheme.qmax
    assert (p.scales.float() > 0).all() and torch.isfinite(p.scales.float()).all()
    # idempotent where the grid reproduces itself: symmetric (-7, 7) on fp32 weights
    if scheme.symmetric and scheme.qrange == (-7, 7) and dtype == torch.float32:
        assert torch.equal(qatpass.fake_quantize(fq, scheme), fq)


@pytest.mark.parametrize("dim", [0, 1])
def test_reduction_dim_other_than_last(dim):
    w = torch.randn(64, 96)
    p = quantize(w, Int4Scheme(), dim=dim)
    k = w.shape[dim]
    assert p.qweight.shape == (w.shape[1 - dim], k // 8)
    assert torch.equal(dequantize(p), qatpass.fake_quantize(w, Int4Scheme(), dim=dim))
    assert torch.equal(dequantize(p), fake_quantize_values(w.t(), Int4Scheme(), dim=1 - dim).t())


def test_moe_expert_weights_pack_per_expert():
    w = torch.randn(4, 48, 64, dtype=torch.bfloat16)
    p = quantize(w)
    assert p.qweight.shape == (4, 48, 8) and p.scales.shape == (4, 48, 2)
    for e in range(4):
        pe = quantize(w[e])
        assert torch.equal(p.qweight[e], pe.qweight) and torch.equal(p.scales[e], pe.scales)


def test_symmetric_extremes_use_full_range():
    w = torch.linspace(-7.5, 7.5, 32).reshape(1, 32)  # amax / 7.5 = 1.0: no scale rounding
    codes = unpack_int4(quantize(w, Int4Scheme(qrange=(-7, 7))).qweight)
    assert codes.min() == -7 and codes.max() == 7
    codes = unpack_int4(quantize(w, Int4Scheme(qrange=(-8, 7))).qweight)
    assert codes.min() == -8 and codes.max() == 7  # -amax / (amax / 7.5) = -7.5 rounds to -8 (even)


def test_asymmetric_one_sided_group_is_exact_at_ends():
    w = torch.linspace(0.5, 2.0, 32).reshape(1, 32)
    s = Int4Scheme(symmetric=False, qrange=(-8, 7), scale_dtype=torch.float32)
    p = quantize(w, s)
    dq = dequantize(p)
    assert p.zeros is not None and p.zeros.dtype == torch.int8
    assert (dq - w).abs().max() <= p.scales.float().max() / 2 + 1e-6


# --- edge values ------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
def test_zero_groups_and_extreme_magnitudes_stay_finite(dtype):
    info = torch.finfo(dtype)
    w = torch.zeros(4, 64, dtype=dtype)
    w[1] = info.max / 2
    w[1, ::2] = -info.max / 2
    w[2] = info.tiny  # smallest normal
    w[3, :32] = info.smallest_normal / 4  # subnormal
    for scheme in (
        Int4Scheme(),
        Int4Scheme(scale_dtype=torch.float16),
        Int4Scheme(symmetric=False),
    ):
        fq = qatpass.fake_quantize(w, scheme)
        assert torch.isfinite(fq).all()
        assert torch.equal(fq[0], torch.zeros_like(fq[0]))
        if scheme.scale_dtype == torch.float16 and info.max / 2 > 7 * 65504:
            with pytest.raises(ValueError, match="float16 scales"):
                quantize(w, scheme)  # the scale of row 1 would saturate
            continue
        assert torch.equal(fq, dequantize(quantize(w, scheme)))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("qrange", [(-8, 7), (-7, 7)])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("scale_dtype", [torch.bfloat16, torch.float32])
def test_weights_at_the_dtype_max_never_dequantize_to_inf(dtype, qrange, symmetric, scale_dtype):
    info = torch.finfo(dtype)
    # fp16 from 61440 under (-8, 7): -amax -> code -8 -> -8 * amax / 7.5 > 65504 (Inf before)
    w = torch.tensor([info.max, info.max * 0.96, info.max * 0.9, 0.0]).repeat(2, 8).to(dtype)
    w[1] = -w[1]
    w[:, ::2] = -w[:, ::2]
    scheme = Int4Scheme(qrange=qrange, symmetric=symmetric, scale_dtype=scale_dtype)
    fq = qatpass.fake_quantize(w, scheme)
    assert torch.isfinite(fq).all()
    if not symmetric and dtype != torch.float16:
        with pytest.raises(ValueError, match="overflows float32"):
            quantize(w, scheme)  # max - min of a group is beyond fp32 itself
        return
    p = quantize(w, scheme)
    assert torch.equal(fq, dequantize(p))
    # the outermost code moved in one step at most: the error stays within one scale
    scales = p.scales.float().repeat_interleave(p.group_size, dim=-1)
    assert ((w.float() - fq.float()).abs() <= scales * (1 + 2**-7)).all()


def test_fp16_weights_near_max_use_the_nearest_finite_code():
    w = torch.tensor([-65504.0, 65504.0, -61440.0, 0.0] * 8, dtype=torch.float16).reshape(1, 32)
    s = Int4Scheme(qrange=(-8, 7))  # scale = bf16(65504 / 7.5) = 8704
    p = quantize(w, s)
    assert p.scales.float().item() == 8704.0
    assert unpack_int4(p.qweight)[0, :4].tolist() == [-7, 7, -7, 0]  # -8 * 8704 = -69632: Inf
    assert dequantize(p)[0, :4].tolist() == [-60928.0, 60928.0, -60928.0, 0.0]


@pytest.mark.parametrize("symmetric", [True, False])
def test_fp16_scale_saturation_is_refused_by_quantize(symmetric):
    s = Int4Scheme(symmetric=symmetric, scale_dtype=torch.float16)
    w = torch.full((2, 32), 7 * 65504.0 * 2.5)
    w[:, ::2] = -w[:, ::2]
    with pytest.raises(ValueError, match="beyond what float16 scales represent"):
        quantize(w, s)
    fq = qatpass.fake_quantize(w, s)  # fake quant saturates (clips) instead: finite, never Inf
    assert torch.isfinite(fq).all() and fq.abs().max() <= 15 * 65504.0
    ok = torch.full((2, 32), 7 * 65504.0)  # exactly the largest representable amax
    assert torch.equal(dequantize(quantize(ok, s)), qatpass.fake_quantize(ok, s))


@pytest.mark.parametrize(
    "shape, dim, match",
    [
        ((), -1, "0-d tensor"),
        ((32,), 0, "1-d tensor"),
        ((4, 0), -1, "size 0"),
        ((4, 32), 2, "dim 2 is out of range"),
        ((4, 32), -3, "dim -3 is out of range"),
    ],
)
@pytest.mark.parametrize("group_size", [32, -1])
def test_bad_shapes_and_dims_are_refused_by_name(shape, dim, match, group_size):
    w = torch.randn(shape)
    s = Int4Scheme(group_size=group_size)
    with pytest.raises(ValueError, match=match):
        quantize(w, s, dim=dim)
    with pytest.raises(ValueError, match=match):
        fake_quantize_values(w, s, dim=dim)


def test_nan_weight_is_reported_on_quantize():
    w = torch.randn(8, 32)
    w[3, 5] = float("nan")
    with pytest.raises(ValueError, match="non-finite"):
        quantize(w)


def test_quantize_rejects_bad_inputs():
    with pytest.raises(TypeError, match="float"):
        quantize(torch.ones(8, 32, dtype=torch.int32))
    with pytest.raises(ValueError, match="not divisible by group_size"):
        quantize(torch.randn(8, 40))
    with pytest.raises(TypeError, match="float"):
        qatpass.fake_quantize(torch.ones(8, 32, dtype=torch.int64))


def test_round_to_dtype_matches_torch_casts():
    x = torch.randn(10_000) * torch.logspace(-30, 30, 10_000)
    for dtype in (torch.bfloat16, torch.float16):
        info = torch.finfo(dtype)
        xc = x.abs().clamp(info.tiny, info.max)
        assert torch.equal(round_to_dtype(xc, dtype), xc.to(dtype).float())


def test_packed_bytes_ratio_at_group_32():
    w = torch.randn(512, 1024, dtype=torch.bfloat16)
    p = quantize(w)
    assert p.nbytes() / (w.numel() * 2) == pytest.approx(0.28125)  # 4 bits + 16-bit scale / 32


# --- straight-through estimator ------------------------------------------------------------------
def test_ste_gradient_is_identity_and_no_grad_to_scales():
    w = torch.randn(16, 64, requires_grad=True)
    out = qatpass.fake_quantize(w)
    g = torch.randn_like(out)
    (out * g).sum().backward()
    assert torch.equal(w.grad, g)
