"""The CPU FP4 kernel (NVFP4, MXFP4 through `native.run_fp4`, the W4A16 kernel's paths) against
the scheme: y == x @ dequantize(p, float32).T up to fp32 summation order, its scale decode exact.

The weights are random packed bytes (every code, scale bytes across their range, E4M3
subnormals, E8M0 0 and 254), not only what `quantize` writes: the kernel must compute the
scheme's `dequantize` of any canonical packed weight. Each path is reached by M and dtype: M = 1
(four row streams), M > 1 (tiles), bf16 M >= GEMM_MIN_M (the GEMM on decoded strips), fp32 x.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from qatpass.kernels.cpu import gemm
from qatpass.kernels.cpu.fp4_native import fp4_kernel_reason, fp4_native_linear
from qatpass.kernels.cpu.native import check_fp4_args, library, run_fp4
from qatpass.scheme import PackedWeight, pack_nibbles
from qatpass.scheme_fp4 import Fp4Scheme

pytestmark = pytest.mark.skipif(
    fp4_kernel_reason(torch.float32) is not None,
    reason=f"FP4 CPU kernel: {fp4_kernel_reason(torch.float32)}",
)

F32 = torch.float32
SCHEMES = {"nvfp4": Fp4Scheme("nvfp4"), "mxfp4": Fp4Scheme("mxfp4")}
# M that reach each path: the four-stream M = 1, the tiles, the GEMM (bf16 only)
GEMM_M = gemm.GEMM_MIN_M or 32


def _packed(codes: torch.Tensor, scale_bytes: torch.Tensor, fmt: str, gs: float | None):
    """The PackedWeight of uint8 codes [N, K] and scale bytes [N, K/B] (as the ops build it)."""
    scheme = SCHEMES[fmt]
    n, k = codes.shape
    scales = scale_bytes.view(torch.float8_e4m3fn) if fmt == "nvfp4" else scale_bytes
    g = None if gs is None else torch.tensor(gs, dtype=F32)
    return PackedWeight(pack_nibbles(codes), scales, None, torch.Size((n, k)), 1, F32, scheme, g)


def _random_packed(n: int, k: int, fmt: str, seed: int) -> PackedWeight:
    """Every code; NVFP4 scale bytes 0..0x7E (subnormals 1..7 included) and a global scale
    around 2**+-8; MXFP4 exponents 2**-20 .. 2**20 (finite sums)."""
    gen = torch.Generator().manual_seed(seed)
    block = SCHEMES[fmt].block_size
    codes = torch.randint(0, 16, (n, k), generator=gen, dtype=torch.uint8)
    if fmt == "nvfp4":
        scale_bytes = torch.randint(0, 0x7F, (n, k // block), generator=gen, dtype=torch.uint8)
        gs = float(2.0 ** (torch.rand((), generator=gen) * 16 - 8) * 448 * 6)
    else:
        scale_bytes = torch.randint(107, 148, (n, k // block), generator=gen, dtype=torch.uint8)
        gs = None
    return _packed(codes, scale_bytes, fmt, gs)


def _check_close(y: torch.Tensor, x: torch.Tensor, w: torch.Tensor) -> None:
    """|y - x @ w.T| within fp32 summation error: the kernel's products x * value are exact, its
    sums and one scale multiply per group round, at most ~K/8 + 32 times per output."""
    xd, wd = x.double(), w.double()
    want = xd @ wd.t()
    k = x.shape[1]
    bound = (k / 8 + 32) * 2.0**-24 * (xd.abs() @ wd.abs().t()) + k * 2.0**-149
    err = (y.double() - want).abs()
    assert y.dtype == F32 and y.shape == want.shape
    assert bool((err <= bound).all()), f"max excess {(err - bound).max().item()}"


def _with_threads(n: int, fn):
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        return fn()
    finally:
        torch.set_num_threads(before)


@settings(max_examples=30, deadline=None)
@given(
    fmt=st.sampled_from(sorted(SCHEMES)),
    n=st.integers(1, 70),
    blocks=st.integers(1, 40),
    m=st.sampled_from([1, 2, 5, 9, GEMM_M, GEMM_M + 7]),
    bf16=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_kernel_is_x_at_dequantized_weight(fmt, n, blocks, m, bf16, seed):
    """Any shape (NVFP4 K % 32 == 16 too), both formats, every path, 1 and 2 threads alike."""
    k = blocks * SCHEMES[fmt].block_size
    p = _random_packed(n, k, fmt, seed)
    w = SCHEMES[fmt].dequantize(p, F32)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(seed + 1))
    x = x.to(torch.bfloat16 if bf16 else F32)

    def run():
        return fp4_native_linear(x, p.qweight, p.scales, p.global_scale, fmt)

    y1, y2 = _with_threads(1, run), _with_threads(2, run)
    assert torch.equal(y1, y2)  # bit-identical at any thread count
    _check_close(y1, x, w)


def _eye_paths(k: int):
    """(name, x, gemm) whose y.T is the weight itself: x = I (K rows, the tiles / GEMM / fp32
    paths) and single rows of I (M = 1). Products with 1 and sums with 0 are exact."""
    eye = torch.eye(k)
    yield "fp32", eye, False
    yield "tiles", eye.bfloat16(), False
    if gemm.gemm_supported():
        yield "gemm", eye.bfloat16(), True
    rows = list(range(0, k, max(1, k // 40))) + [k - 1]
    yield "m1", [eye[i : i + 1].bfloat16() for i in rows], rows


def _assert_weight_is_exact(p: PackedWeight, fmt: str) -> None:
    w = SCHEMES[fmt].dequantize(p, F32)
    k = w.shape[1]
    for name, x, extra in _eye_paths(k):
        if name == "m1":
            got = torch.cat([run_fp4(library(), xi, p.qweight, p.scales, p.global_scale, fmt)
                             for xi in x])  # fmt: skip
            assert torch.equal(got, w.t()[extra]), name
            continue
        y = run_fp4(library(), x, p.qweight, p.scales, p.global_scale, fmt, gemm=extra)
        assert torch.equal(y.t(), w), name


# global scales: the scheme's typical ones, and beyond 2**117 / under 2**-118, where the kernel
# divides (vdivps) instead of its exact table
@pytest.mark.parametrize("gs", [2688 / 0.037, 1.0, 3.0, 7.123e20, 2.0**-118, 2.0**117, 2.0**118,
                                2.0**-119, 1e38])  # fmt: skip
def test_every_e4m3_scale_decodes_to_the_schemes_division(gs):
    """All 254 E4M3 bytes (subnormals, negatives, 0) divided by the global scale, bit for bit."""
    scale_bytes = torch.tensor([b for b in range(256) if b not in (0x7F, 0xFF)], dtype=torch.uint8)
    k = 16 * scale_bytes.numel()
    codes = torch.full((2, k), 2, dtype=torch.uint8)  # 1.0
    codes[1] = 10  # -1.0
    _assert_weight_is_exact(_packed(codes, scale_bytes.repeat(2, 1), "nvfp4", gs), "nvfp4")


def test_every_e8m0_scale_including_0_and_254_is_exact():
    """2**(e - 127) for e = 0 (the fp32 subnormal 2**-127) .. 254 (2**127), bit for bit."""
    scale_bytes = torch.arange(255, dtype=torch.uint8)
    k = 32 * scale_bytes.numel()
    codes = torch.full((2, k), 1, dtype=torch.uint8)  # 0.5: e = 254 stays finite (2**126)
    codes[1] = 15  # -6.0 (2**127 * 6 overflows to -inf in the scheme and here alike)
    _assert_weight_is_exact(_packed(codes, scale_bytes.repeat(2, 1), "mxfp4", None), "mxfp4")


@pytest.mark.parametrize("fmt", sorted(SCHEMES))
@pytest.mark.parametrize("m", [1, 3, GEMM_M])
@pytest.mark.parametrize("dtype", [F32, torch.bfloat16])
def test_zero_blocks_and_rows_from_the_scheme(fmt, m, dtype):
    """Weights `quantize` wrote, with zero blocks and a zero row: the row's outputs are 0."""
    scheme = SCHEMES[fmt]
    w = torch.randn(24, 8 * scheme.block_size)
    w[3] = 0
    w[5, : scheme.block_size] = 0
    w[7, -scheme.block_size :] = 0
    p = scheme.quantize(w, 1)
    x = torch.randn(m, w.shape[1]).to(dtype)
    y = fp4_native_linear(x, p.qweight, p.scales, p.global_scale, fmt)
    assert bool((y[:, 3] == 0).all())
    _check_close(y, x, scheme.dequantize(p, F32))


@pytest.mark.parametrize("fmt", sorted(SCHEMES))
def test_small_e8m0_and_e4m3_scales_in_sums(fmt):
    """MXFP4 blocks at 2**-127 (products and sums in the subnormal range) and NVFP4 subnormal
    E4M3 scales, summed with ordinary blocks, every path."""
    n, k = 9, 256
    p = _random_packed(n, k, fmt, seed=3)
    raw = p.scales.view(torch.uint8).clone()
    raw[:, ::2] = 0 if fmt == "mxfp4" else torch.randint(1, 8, raw[:, ::2].shape, dtype=torch.uint8)
    p = PackedWeight(p.qweight, raw.view(p.scales.dtype), None, p.shape, 1, F32, p.scheme,
                     p.global_scale)  # fmt: skip
    w = SCHEMES[fmt].dequantize(p, F32)
    for m, dtype in ((1, torch.bfloat16), (4, torch.bfloat16), (GEMM_M, torch.bfloat16), (4, F32)):
        x = torch.randn(m, k).to(dtype)
        _check_close(fp4_native_linear(x, p.qweight, p.scales, p.global_scale, fmt), x, w)


def test_refusals_name_the_argument():
    p = _random_packed(4, 64, "nvfp4", seed=0)
    x = torch.randn(2, 64)
    with pytest.raises(ValueError, match="global_scale"):
        check_fp4_args(x, p.qweight, p.scales, None, "nvfp4")
    with pytest.raises(ValueError, match="scales"):
        check_fp4_args(x, p.qweight, p.scales.view(torch.uint8), p.global_scale, "nvfp4")
    with pytest.raises(ValueError, match="qweight"):
        check_fp4_args(torch.randn(2, 48), p.qweight, p.scales, p.global_scale, "nvfp4")
    with pytest.raises(ValueError, match="fmt"):
        check_fp4_args(x, p.qweight, p.scales, p.global_scale, "fp4")
    with pytest.raises(ValueError, match="x must be"):
        check_fp4_args(x.half(), p.qweight, p.scales, p.global_scale, "nvfp4")
    assert fp4_native_linear(x.half(), p.qweight, p.scales, p.global_scale, "nvfp4") is None


@pytest.mark.parametrize("fmt", sorted(SCHEMES))
@pytest.mark.parametrize("m", [3, 7])
def test_tiles_that_split_k_at_an_odd_block(fmt, m):
    """Long K: the tile path passes over x in spans of 64 / M blocks (21 for M = 3, 9 for 7), so
    a pass starts inside a chunk of decoded scales."""
    k = 3072
    p = _random_packed(6, k, fmt, seed=m)
    x = torch.randn(m, k).bfloat16()
    y = run_fp4(library(), x, p.qweight, p.scales, p.global_scale, fmt)
    _check_close(y, x, SCHEMES[fmt].dequantize(p, F32))
