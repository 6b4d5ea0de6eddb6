"""The native INT4 quantize (kernels/cpu/quant_native.py) equals the scheme's torch formulas,
bit for bit: qweight, scales and zeros, errors with the same message."""

from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from tiny_models import tiny_llama, tiny_qwen3_moe

import qatpass
from qatpass.kernels.cpu import quant_native
from qatpass.scheme import Int4Scheme, _dtype_clamp_is_noop, compute_qparams, quantize

pytestmark = pytest.mark.skipif(
    quant_native.quant_kernel_reason() is not None,
    reason=f"native quantize unavailable: {quant_native.quant_kernel_reason()}",
)

FLOATS = (torch.float32, torch.bfloat16, torch.float16)
GROUP_SIZES = (-1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096)
QRANGES = ((-7, 7), (-8, 7))
_BITS = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16}


def _outcome(w: torch.Tensor, scheme: Int4Scheme, dim: int = -1):
    """The packed tensors quantize gives, or its ValueError's message."""
    try:
        p = quantize(w, scheme, dim)
    except ValueError as e:
        return str(e)
    assert (p.shape, p.dim, p.dtype, p.scheme) == (w.shape, dim % w.dim(), w.dtype, scheme)
    zeros = None if p.zeros is None else p.zeros
    return p.qweight, p.scales.dtype, p.scales.view(_BITS[p.scales.dtype]), zeros


def _same(a, b) -> None:
    if isinstance(a, str) or isinstance(b, str):
        assert a == b
        return
    assert a[1] == b[1]
    for x, y in zip((a[0], a[2], a[3]), (b[0], b[2], b[3]), strict=True):
        assert (x is None) == (y is None)
        if x is not None:
            assert x.dtype == y.dtype and x.shape == y.shape
            assert torch.equal(x, y)


def check_native(w: torch.Tensor, scheme: Int4Scheme, dim: int = -1):
    """native == torch path, and a packed result is the kernel's (not a fallback)."""
    native = _outcome(w, scheme, dim)
    with quant_native.disabled():
        ref = _outcome(w, scheme, dim)
    _same(native, ref)
    if not isinstance(native, str):
        x = w.movedim(dim, -1).contiguous()
        assert quant_native.quantize_int4_native(x, scheme) is not None
    return native


@st.composite
def cases(draw):
    g = draw(st.sampled_from(GROUP_SIZES))
    k = 8 * draw(st.integers(1, 40)) if g == -1 else g * draw(st.integers(1, max(1, 1024 // g)))
    rows = draw(st.integers(1, 4 if k >= 1024 else 9))
    dtype = draw(st.sampled_from(FLOATS))
    scheme = Int4Scheme(
        g, draw(st.booleans()), draw(st.sampled_from(QRANGES)), draw(st.sampled_from(FLOATS))
    )
    top = 4 if dtype == torch.float16 else 30
    exponent = draw(st.integers(-12 if dtype == torch.float16 else -45, top))
    offset = draw(st.sampled_from((0.0, 0.5, -3.0)))
    zero_rows = draw(st.booleans())
    seed = draw(st.integers(0, 2**31 - 1))
    return rows, k, dtype, scheme, exponent, offset, zero_rows, seed


@settings(max_examples=150, deadline=None)
@given(cases())
def test_native_equals_torch(case):
    rows, k, dtype, scheme, exponent, offset, zero_rows, seed = case
    gen = torch.Generator().manual_seed(seed)
    w = (torch.randn(rows, k, generator=gen) + offset) * 10.0**exponent
    if zero_rows:
        w[::2] = 0.0
    w = w.to(dtype)
    check_native(w, scheme)


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("dtype", FLOATS)
def test_all_zero_and_constant_groups(symmetric, dtype):
    w = torch.zeros(4, 64, dtype=dtype)
    w[1, :32] = -0.0
    w[2] = 3.0
    w[3, 32:] = -5.0
    for g in (8, 16, 32, -1):
        check_native(w, Int4Scheme(g, symmetric, (-8, 7), torch.bfloat16))


@pytest.mark.parametrize("scale_dtype", FLOATS)
@pytest.mark.parametrize("dtype", FLOATS)
def test_subnormal_weights(dtype, scale_dtype):
    tiny = torch.finfo(dtype).tiny
    w = torch.randn(6, 128) * tiny * torch.tensor([1.0, 0.5, 1e-2, 1e-4, 1e3, 7.0])[:, None]
    w = w.to(dtype)
    assert (w.abs() < tiny).any() and (w != 0).any()
    for symmetric in (True, False):
        for g in (8, 32, -1):
            check_native(w, Int4Scheme(g, symmetric, (-8, 7), scale_dtype))


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("scale_dtype", [torch.float16, torch.float32])
def test_huge_weights_near_the_scale_limit(symmetric, scale_dtype):
    smax = torch.finfo(scale_dtype).max
    scheme = Int4Scheme(16, symmetric, (-8, 7), scale_dtype)
    limit = 7.5 * smax if symmetric else 15 * smax
    w = torch.randn(3, 64, dtype=torch.float64).clamp(-1, 1)
    w[:, 0] = 1.0
    if not symmetric:
        w[:, 1] = 0.0  # lo = 0: max - min is the max
        w = w.abs()
    for factor in (0.999, 1.0, 1.001, 1.1):
        x = (w * limit * factor).to(torch.float32)
        if not torch.isfinite(x).all():
            continue
        out = check_native(x, scheme)
        if factor > 1.0:
            assert isinstance(out, str) and "beyond what" in out


def test_fp32_range_overflow_same_message():
    big = torch.finfo(torch.float32).max
    w = torch.zeros(2, 32)
    w[0, 0], w[0, 1] = big, -big  # hi - lo overflows to inf
    out = check_native(w, Int4Scheme(32, False, (-8, 7), torch.float32))
    assert isinstance(out, str) and "overflows float32" in out


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_same_error(dtype, bad):
    scheme = Int4Scheme(32, False, (-8, 7), torch.bfloat16)
    w = torch.randn(3, 64).to(dtype)
    w[1, 5] = bad
    w[2, 63] = bad
    out = check_native(w, scheme)
    assert out == "weight of shape (3, 64) has 2 non-finite values (NaN/Inf)"
    # the kernel's own check (`scheme.quantize` skips the module-level one): the same error
    with pytest.raises(ValueError) as e:
        scheme.quantize(w, 1)
    assert str(e.value) == out


@pytest.mark.parametrize("qrange", QRANGES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_dtype_clamp_at_the_weight_dtypes_edge(dtype, qrange):
    wmax = torch.finfo(dtype).max
    w = torch.randn(4, 64).clamp(-1, 1)
    w[:, 0] = -1.0  # -amax: under (-8, 7) its code would dequantize beyond the dtype's max
    w[:2] *= wmax
    w = w.to(dtype)
    for symmetric in (True, False):
        for scale_dtype in (torch.bfloat16, torch.float32):
            scheme = Int4Scheme(32, symmetric, qrange, scale_dtype)
            groups = w.float().reshape(4, 2, 32)
            scales, _ = compute_qparams(groups, scheme)
            if symmetric and qrange == (-8, 7):
                assert not _dtype_clamp_is_noop(scales, scheme, dtype)
            out = check_native(w, scheme)
            if symmetric or dtype == torch.float16:  # else max - min overflows float32
                assert not isinstance(out, str)
                assert torch.isfinite(qatpass.dequantize(quantize(w, scheme))).all()


@pytest.mark.parametrize("scale_dtype", FLOATS)
def test_ties_round_half_to_even(scale_dtype):
    s = 0.25
    # symmetric (-8, 7): amax = 7.5 s makes s exact; every other value is (n + 0.5) s
    halves = torch.arange(-8, 7, dtype=torch.float32) + 0.5
    w = torch.cat([torch.tensor([7.5, 0.0]), halves, -halves]).mul(s)[None].repeat(2, 1)
    scheme = Int4Scheme(32, True, (-8, 7), scale_dtype)
    check_native(w, scheme)
    p = quantize(w, scheme)
    assert float(p.scales[0, 0]) == s
    codes = qatpass.scheme.unpack_int4(p.qweight)[0].float()
    expected = (w[0] / s).round().clamp(-8, 7)  # half to even
    assert torch.equal(codes, expected)
    # asymmetric: lo / s = -2.5 exactly, hi - lo = 15 s, so the zero point is a tie too
    s = 0.125
    w = torch.tensor([-2.5, 12.5, 0.0, 1.0] + [n + 0.5 for n in range(-2, 12)] * 2)[None].mul(s)
    scheme = Int4Scheme(32, False, (-8, 7), scale_dtype)
    check_native(w, scheme)
    p = quantize(w, scheme)
    assert float(p.scales[0, 0]) == s and int(p.zeros[0, 0]) == -6


@pytest.mark.parametrize("dim", [0, 1, 2])
def test_expert_weights_3d(dim):
    w = torch.randn(3, 32, 48) if dim != 0 else torch.randn(16, 8, 8)
    for symmetric in (True, False):
        check_native(w, Int4Scheme(8 if dim == 0 else 16, symmetric, (-7, 7), torch.bfloat16), dim)


def test_conv1d_dim0():
    check_native(torch.randn(256, 96), Int4Scheme(32, False, (-8, 7), torch.float16), dim=0)


def test_thread_count_changes_nothing():
    x = torch.randn(300, 512)
    scheme = Int4Scheme(32, False, (-8, 7), torch.float16)
    threads = torch.get_num_threads()
    outs = []
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            outs.append(_outcome(x, scheme))
    finally:
        torch.set_num_threads(threads)
    _same(*outs)


def _packed_buffers(qmodel) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in qmodel.state_dict().items()}


@pytest.mark.parametrize("make", [tiny_llama, tiny_qwen3_moe])
def test_refresh_same_buffers(make):
    model = make()
    scheme = Int4Scheme(32, False, (-8, 7), torch.bfloat16)
    qmodel = qatpass.convert(model, scheme=scheme)
    assert qatpass.packed_weights(qmodel)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    reference = copy.deepcopy(qmodel)
    with quant_native.disabled():
        qatpass.refresh(reference, model)
    qatpass.refresh(qmodel, model)
    got, want = _packed_buffers(qmodel), _packed_buffers(reference)
    assert got.keys() == want.keys()
    for key in want:
        assert torch.equal(got[key], want[key]), key


@settings(max_examples=60, deadline=None)
@given(cases())
def test_plain_c_loops_equal_the_simd_ones(case):
    rows, k, dtype, scheme, exponent, offset, zero_rows, seed = case
    gen = torch.Generator().manual_seed(seed)
    w = ((torch.randn(rows, k, generator=gen) + offset) * 10.0**exponent).to(dtype)
    if zero_rows:
        w[::2] = 0.0
    if not torch.isfinite(w).all():
        return
    simd = quant_native.quantize_int4_native(w, scheme)
    plain = quant_native.quantize_int4_native(w, scheme, _simd=False)
    assert (simd is None) == (plain is None)
    if simd is not None:
        for a, b in zip(simd, plain, strict=True):
            assert (a is None) == (b is None)
            if a is not None:
                assert torch.equal(a.view(torch.uint8), b.view(torch.uint8))
