"""qatpass's native CPU W4A16 kernel (csrc/w4a16_cpu.c) against the scheme's math."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from qatpass.kernels.cpu import native as cpu_kernel
from qatpass.kernels.cpu.native import disabled, native_linear, native_reason
from qatpass.lowering import convert
from qatpass.scheme import Int4Scheme, dequantize, quantize

from conftest import ACCUM, needs_native

w4a16_linear = torch.ops.qatpass.w4a16_linear


def _exact(x, p, bias):
    """x @ W.T (+ bias) in float64 from the scheme's dequantized weight."""
    y = x.double() @ dequantize(p, torch.float64).t()
    return y if bias is None else y + bias.double()


def _run(x, p, bias=None):
    return native_linear(x, p.qweight, p.scales, p.zeros, bias, p.group_size)


def _check(y, x, p, bias):
    """bf16: within one bf16 rounding of the exact value (fp32 sums, one final rounding);
    fp32: within 2^-20 of the sum of |products| (fp32 accumulation error, any order)."""
    ref = _exact(x, p, bias)
    assert y.dtype == x.dtype and y.shape == ref.shape
    magnitude = x.double().abs() @ dequantize(p, torch.float64).abs().t()
    err = (y.double() - ref).abs()
    if x.dtype == torch.bfloat16:
        bound = ref.abs() * 2**-8 + magnitude * 2**-20
    else:
        bound = magnitude * 2**-20
    assert bool((err <= bound).all()), float((err - bound).max())


@needs_native
@pytest.mark.parametrize("m", [1, 3, 8, 9, 33])
@pytest.mark.parametrize(
    ("n", "k", "group_size"),  # K % 64 == 32 (a half chunk at the end) in the last four
    [(48, 256, 32), (48, 256, 64), (48, 256, -1), (40, 96, 32), (40, 96, -1), (7, 1056, 32),
     (7, 1056, -1)],
)  # fmt: skip
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("has_bias", [False, True])
@pytest.mark.parametrize("symmetric", [True, False])
def test_native_matches_the_scheme(m, n, k, group_size, dtype, has_bias, symmetric):
    scheme = Int4Scheme(group_size=group_size, symmetric=symmetric)
    if not symmetric:
        scheme = Int4Scheme(group_size=group_size, symmetric=False, qrange=(-8, 7))
    w = torch.randn(n, k).to(dtype) + (0.0 if symmetric else 0.7)  # off-centre: zeros matter
    p = quantize(w, scheme)
    x = torch.randn(m, k).to(dtype)
    bias = torch.randn(n).to(dtype) if has_bias else None
    _check(_run(x, p, bias), x, p, bias)


@needs_native
@pytest.mark.parametrize("scale_dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_native_reads_every_scale_dtype(scale_dtype, dtype):
    p = quantize(torch.randn(32, 128), Int4Scheme(group_size=32, scale_dtype=scale_dtype))
    x = torch.randn(5, 128).to(dtype)
    _check(_run(x, p), x, p, None)


@needs_native
@settings(max_examples=40, deadline=None)
@given(
    m=st.integers(1, 20),
    n=st.integers(1, 150),
    blocks=st.integers(1, 20),
    log_group=st.integers(5, 8),
    dtype=st.sampled_from([torch.bfloat16, torch.float32]),
    symmetric=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_native_shapes_and_groups(m, n, blocks, log_group, dtype, symmetric, seed):
    torch.manual_seed(seed)
    group = 2**log_group
    k = 32 * blocks * max(1, group // 32)
    qrange = (-7, 7) if symmetric else (-8, 7)
    p = quantize(
        torch.randn(n, k).to(dtype),
        Int4Scheme(group_size=group, symmetric=symmetric, qrange=qrange),
    )
    x = torch.randn(m, k).to(dtype)
    _check(_run(x, p), x, p, None)


@needs_native
def test_native_is_deterministic_across_thread_counts():
    """Rows are split across threads, each row's sum keeps its order: bit-equal results."""
    p = quantize(torch.randn(256, 512).bfloat16(), Int4Scheme())
    x = torch.randn(4, 512).bfloat16()
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = native_linear(x, p.qweight, p.scales, None, None, 32)
        torch.set_num_threads(2)
        two = native_linear(x, p.qweight, p.scales, None, None, 32)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, two)


@needs_native
def test_the_op_runs_native_by_default_and_the_fallback_when_disabled():
    p = quantize(torch.randn(64, 128), Int4Scheme())
    x = torch.randn(3, 128)
    native = w4a16_linear(x, p.qweight, p.scales, group_size=32)
    torch.testing.assert_close(
        native, native_linear(x, p.qweight, p.scales, None, None, 32), rtol=0, atol=0
    )
    with disabled():
        fallback = w4a16_linear(x, p.qweight, p.scales, group_size=32)
    torch.testing.assert_close(fallback, F.linear(x, dequantize(p)), rtol=0, atol=0)
    torch.testing.assert_close(native, fallback, **ACCUM[torch.float32])


@needs_native
def test_native_under_compile_aot_eager():
    p = quantize(torch.randn(64, 128).bfloat16(), Int4Scheme())

    def f(x):
        return w4a16_linear(x, p.qweight, p.scales, group_size=32).relu()

    x = torch.randn(2, 3, 128).bfloat16()
    got = torch.compile(f, backend="aot_eager", fullgraph=True)(x)
    torch.testing.assert_close(got, f(x), rtol=0, atol=0)


@pytest.mark.parametrize(
    ("dtype", "scale_dtype", "k", "group", "why"),
    [
        (torch.float16, torch.float16, 128, 32, "activation dtype"),
        (torch.bfloat16, torch.bfloat16, 136, 136, "multiples of 32"),
        (torch.bfloat16, torch.bfloat16, 128, 16, "multiples of 32"),
        (torch.bfloat16, torch.bfloat16, 192, 96, "power of two"),
    ],
)
def test_native_refusals(dtype, scale_dtype, k, group, why):
    reason = native_reason(dtype, scale_dtype, k, group)
    assert reason is not None
    assert why in reason or cpu_kernel.kernel_unavailable_reason() is not None


def test_disabled_names_itself():
    with disabled():
        assert "disabled" in cpu_kernel.kernel_unavailable_reason()


def test_a_failing_compiler_gives_a_clear_error(tmp_path):
    with pytest.raises(RuntimeError, match="failed"):
        cpu_kernel._compile("false", tmp_path / "lib.so")
    assert not list(tmp_path.iterdir())  # no half-written library left behind


@needs_native
def test_asymmetric_convert_takes_the_native_kernel():
    linear = torch.nn.Linear(128, 64).bfloat16()
    scheme = Int4Scheme(symmetric=False, qrange=(-8, 7))
    qlinear = convert(linear, scheme=scheme, exclude=())
    assert qlinear.cpu_path == "native"
    x = torch.randn(3, 128).bfloat16()
    w = dequantize(qlinear.packed(), torch.float32)
    ref = F.linear(x.float(), w, linear.bias.float())
    torch.testing.assert_close(qlinear(x).float(), ref, **ACCUM[torch.bfloat16])


@needs_native
def test_native_linear_refuses_bad_input():
    p = quantize(torch.randn(32, 128), Int4Scheme())
    x = torch.randn(2, 128)
    with pytest.raises(ValueError, match="x has K=96"):
        native_linear(torch.randn(2, 96), p.qweight, p.scales, None, None, 32)
    with pytest.raises(ValueError, match="scales must have shape"):
        native_linear(x, p.qweight, p.scales[:, :2], None, None, 32)
    with pytest.raises(ValueError, match=r"x must be \[M, K\]"):
        native_linear(x[None], p.qweight, p.scales, None, None, 32)
    with pytest.raises(ValueError, match="activation dtype"):
        native_linear(x.half(), p.qweight, p.scales, None, None, 32)


# --- the per-M choice inside kernels.cpu.linear: native kernel, or the GEMM on decoded strips ---

from qatpass.kernels.cpu import gemm  # noqa: E402
from qatpass.kernels.cpu import linear as cpu_linear  # noqa: E402


def _scheme(group_size, symmetric, scale_dtype=torch.bfloat16):
    qrange = (-7, 7) if symmetric else (-8, 7)
    return Int4Scheme(group_size=group_size, symmetric=symmetric, qrange=qrange,
                      scale_dtype=scale_dtype)  # fmt: skip


@needs_native
@pytest.mark.parametrize("m", [64, 77])
@pytest.mark.parametrize(
    ("n", "k", "group_size"), [(300, 256, 32), (40, 96, -1), (17, 1088, 64), (19, 1056, 32)]
)
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("has_bias", [False, True])
def test_gemm_path_matches_the_scheme(m, n, k, group_size, symmetric, has_bias, monkeypatch):
    if not gemm.gemm_supported():
        pytest.skip("the GEMM needs AVX-512 VBMI")
    monkeypatch.setattr(gemm, "GEMM_MIN_M", 64)
    p = quantize(torch.randn(n, k) + (0 if symmetric else 0.7), _scheme(group_size, symmetric))
    x = torch.randn(m, k).bfloat16()
    bias = torch.randn(n).bfloat16() if has_bias else None
    assert gemm.use_gemm(x)
    y = cpu_linear(x, p.qweight, p.scales, p.zeros, bias, group_size=p.group_size)
    _check(y, x, p, bias)


@needs_native
@pytest.mark.parametrize("m", [1, 2, 9, 67])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("gemm_min_m", [None, 64])
def test_every_path_is_bit_identical_on_1_and_2_threads(m, dtype, symmetric, gemm_min_m,
                                                         monkeypatch):  # fmt: skip
    monkeypatch.setattr(gemm, "GEMM_MIN_M", gemm_min_m)
    p = quantize(torch.randn(520, 640).to(dtype), _scheme(32, symmetric))
    x = torch.randn(m, 640).to(dtype)
    bias = torch.randn(520).to(dtype)
    threads = torch.get_num_threads()
    out = []
    try:
        for t in (1, 2):
            torch.set_num_threads(t)
            out.append(cpu_linear(x, p.qweight, p.scales, p.zeros, bias, group_size=32))
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(out[0], out[1])


@needs_native
@pytest.mark.parametrize("m", [2, 3, 4])
@pytest.mark.parametrize(("n", "k", "group_size"), [(37, 640, 32), (6, 1088, 64), (4, 256, -1)])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("scale_dtype", [torch.bfloat16, torch.float32])
def test_small_batch_rows_equal_single_row_calls_bit_for_bit(m, n, k, group_size, symmetric,
                                                              scale_dtype):  # fmt: skip
    """M <= 4 shares M = 1's four streams and sum order: a rollout row gets the same logits
    alone as in a small batch."""
    p = quantize(torch.randn(n, k), _scheme(group_size, symmetric, scale_dtype))
    x = torch.randn(m, k).bfloat16()
    bias = torch.randn(n).bfloat16()
    y = cpu_linear(x, p.qweight, p.scales, p.zeros, bias, group_size=p.group_size)
    for r in range(m):
        alone = cpu_linear(x[r : r + 1], p.qweight, p.scales, p.zeros, bias,
                           group_size=p.group_size)  # fmt: skip
        assert torch.equal(y[r : r + 1], alone)
    _check(y, x, p, bias)


@needs_native
@settings(max_examples=30, deadline=None)
@given(
    m=st.integers(1, 72),
    n=st.integers(1, 70),
    blocks=st.integers(1, 12),
    log_group=st.integers(5, 8),
    dtype=st.sampled_from([torch.bfloat16, torch.float32]),
    symmetric=st.booleans(),
    scale_dtype=st.sampled_from([torch.bfloat16, torch.float16, torch.float32]),
    seed=st.integers(0, 2**16),
)
def test_cpu_linear_every_m(m, n, blocks, log_group, dtype, symmetric, scale_dtype, seed):
    """kernels.cpu.linear at any M: the native kernel or, for bf16 x from GEMM_MIN_M rows, the
    GEMM on decoded strips; both compute with the scheme's fp32 weights."""
    torch.manual_seed(seed)
    group = 2**log_group
    k = 32 * blocks * max(1, group // 32)
    p = quantize(torch.randn(n, k).to(dtype), _scheme(group, symmetric, scale_dtype))
    x = torch.randn(m, k).to(dtype)
    y = cpu_linear(x, p.qweight, p.scales, p.zeros, None, group_size=p.group_size)
    _check(y, x, p, None)
