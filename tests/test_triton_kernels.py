"""The fused W4A16 Triton kernels against the scheme's own dequantize, in the Triton interpreter.

conftest sets TRITON_INTERPRET=1 before triton is imported, so on CPU every kernel runs for real,
just slowly: shapes stay tiny. Reference: x.float() @ dequantize(p, dtype=x.dtype).float().T.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import triton
import triton.language as tl
from ptx_interp import bits16, run_ptx

import qatpass
from qatpass.kernels.triton import (
    GEMV_MAX_M,
    gemm,
    gemv,
    grouped,
    plan,
    w4a16_grouped_matmul,
    w4a16_matmul,
)
from qatpass.kernels.triton.splitk_reduce import splitk_reduce

from conftest import ACCUM, EXACT

N = 72  # not a multiple of any BLOCK_N
K_FOR_GROUP = {32: 160, 64: 192, 128: 256}  # K not a multiple of the bigger BLOCK_Ks

pytestmark = pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available(),
    reason="needs a CUDA device or TRITON_INTERPRET=1",
)
DEVICE = "cpu" if os.environ.get("TRITON_INTERPRET") == "1" else "cuda"


def _packed(shape, group_size, symmetric=True, scale_dtype=torch.bfloat16):
    scheme = qatpass.Int4Scheme(
        group_size=group_size,
        symmetric=symmetric,
        qrange=(-7, 7) if symmetric else (-8, 7),
        scale_dtype=scale_dtype,
    )
    w = torch.randn(shape)
    if not symmetric:  # offset rows so the zero points are not all in the middle
        w = w + torch.linspace(-2, 2, shape[-2]).unsqueeze(-1)
    p = qatpass.quantize(w, scheme)
    return p, tuple(t if t is None else t.to(DEVICE) for t in (p.qweight, p.scales, p.zeros))


def _reference(x, p, bias=None):
    ref = x.float() @ qatpass.dequantize(p, dtype=x.dtype).float().to(x.device).T
    return ref if bias is None else ref + bias.float()


@pytest.mark.parametrize("m", [1, 3, 16, 33, 128])
@pytest.mark.parametrize("group_size", [32, 64, 128])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize(("dtype", "with_bias"), [(torch.bfloat16, True), (torch.float16, False)])
def test_matmul_matches_dequantized_reference(m, group_size, symmetric, dtype, with_bias):
    k = K_FOR_GROUP[group_size]
    p, (qweight, scales, zeros) = _packed((N, k), group_size, symmetric)
    x = torch.randn(m, k, dtype=dtype, device=DEVICE)
    bias = torch.randn(N, dtype=dtype, device=DEVICE) if with_bias else None
    y = w4a16_matmul(x, qweight, scales, zeros, group_size=group_size, bias=bias)
    assert y.shape == (m, N) and y.dtype == dtype
    torch.testing.assert_close(y.float(), _reference(x, p, bias), **ACCUM[dtype])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("m", [2, 40])
def test_bias_without_zeros_and_zeros_without_bias(dtype, m):
    """The (bias, symmetric) combinations the main grid leaves out."""
    p, (qweight, scales, zeros) = _packed((N, 128), 64, symmetric=False)
    x = torch.randn(m, 128, dtype=dtype, device=DEVICE)
    bias = torch.randn(N, dtype=torch.float32, device=DEVICE)
    y = w4a16_matmul(x, qweight, scales, zeros, group_size=64, bias=bias)
    torch.testing.assert_close(y.float(), _reference(x, p, bias), **ACCUM[dtype])


@pytest.mark.parametrize("m", [1, 24])
def test_fp32_activations(m):
    p, (qweight, scales, _) = _packed((N, 128), 32)
    x = torch.randn(m, 128, device=DEVICE)
    y = w4a16_matmul(x, qweight, scales, group_size=32)
    assert y.dtype == torch.float32
    torch.testing.assert_close(y, _reference(x, p), **ACCUM[torch.float32])


@pytest.mark.parametrize("scale_dtype", [torch.float16, torch.float32])
def test_scale_dtypes(scale_dtype):
    p, (qweight, scales, _) = _packed((N, 128), 32, scale_dtype=scale_dtype)
    x = torch.randn(5, 128, dtype=torch.float16, device=DEVICE)
    y = w4a16_matmul(x, qweight, scales, group_size=32)
    torch.testing.assert_close(y.float(), _reference(x, p), **ACCUM[torch.float16])


@pytest.mark.parametrize("m", [1, 20])
def test_per_channel_group_size(m):
    p, (qweight, scales, _) = _packed((N, 96), -1)
    assert scales.shape == (N, 1)
    x = torch.randn(m, 96, dtype=torch.bfloat16, device=DEVICE)
    y = w4a16_matmul(x, qweight, scales, group_size=-1)
    torch.testing.assert_close(y.float(), _reference(x, p), **ACCUM[torch.bfloat16])


@pytest.mark.parametrize("lead", [(2, 3), (4, 1, 5)])
def test_leading_dims_are_flattened(lead):
    p, (qweight, scales, _) = _packed((N, 64), 32)
    x = torch.randn(*lead, 64, dtype=torch.bfloat16, device=DEVICE)
    y = w4a16_matmul(x, qweight, scales, group_size=32)
    assert y.shape == (*lead, N)
    ref = _reference(x.reshape(-1, 64), p).reshape(*lead, N)
    torch.testing.assert_close(y.float(), ref, **ACCUM[torch.bfloat16])


def test_non_contiguous_activations():
    p, (qweight, scales, _) = _packed((N, 64), 32)
    x = torch.randn(64, 12, dtype=torch.float16, device=DEVICE).T  # [12, 64], stride (1, 12)
    y = w4a16_matmul(x, qweight, scales, group_size=32)
    torch.testing.assert_close(y.float(), _reference(x, p), **ACCUM[torch.float16])


def test_empty_batch():
    _, (qweight, scales, _) = _packed((N, 64), 32)
    x = torch.randn(0, 64, dtype=torch.bfloat16, device=DEVICE)
    assert w4a16_matmul(x, qweight, scales, group_size=32).shape == (0, N)


@pytest.mark.parametrize(
    ("launcher", "m"), [(gemv.w4a16_gemv, 1), (gemv.w4a16_gemv, 2), (gemm.w4a16_gemm, 20)]
)
@pytest.mark.parametrize("split_k", [1, 2, 8])
def test_split_k_matches_and_is_deterministic(launcher, m, split_k):
    """split_k=8 leaves some splits without a K block: they must add exact zeros."""
    p, (qweight, scales, zeros) = _packed((N, 256), 32, symmetric=False)
    x = torch.randn(m, 256, dtype=torch.bfloat16, device=DEVICE)
    bias = torch.randn(N, dtype=torch.bfloat16, device=DEVICE)
    run = lambda: launcher(x, qweight, scales, zeros, group_size=32, bias=bias, split_k=split_k)  # noqa: E731
    y = run()
    torch.testing.assert_close(y.float(), _reference(x, p, bias), **ACCUM[torch.bfloat16])
    torch.testing.assert_close(run(), y, **EXACT)


def test_splitk_reduce_grid_covers_the_sms():
    from qatpass.kernels.triton.splitk_reduce import reduce_block

    assert reduce_block(4096, 132) == 128  # a decode GEMV's outputs: 32 programs, not 4
    assert reduce_block(16 * 4096, 132) == 256 and reduce_block(1 << 20, 132) == 1024


def test_splitk_reduce_sums_in_order_and_casts():
    partials = torch.randn(3, 5, 7, device=DEVICE)
    bias = torch.randn(7, device=DEVICE)
    out = splitk_reduce(partials, bias=bias, dtype=torch.float16)
    ref = (partials[0] + partials[1] + partials[2] + bias).half()
    torch.testing.assert_close(out, ref, **EXACT)


GEMM_TILE_ROWS = [(row, False) for row in plan.GEMM_TILES] + [
    (row, True) for row in plan.GEMM_SWAP_TILES
]


@pytest.mark.parametrize(
    ("n", "k", "group_size"), [(72, 128, 32), (24, 1024, 128), (72, 160, 32), (40, 256, 16)]
)
@pytest.mark.parametrize("tile", range(len(GEMM_TILE_ROWS)))
def test_every_gemm_tile_is_correct(n, k, group_size, tile):
    """The interpreter runs the plan's tile for the shape; force each row of GEMM_TILES and of
    GEMM_SWAP_TILES (operands swapped, BLOCK_K spanning several groups: 4 or 8 a tile, and a
    K tail that ends mid-tile) once; K = 1024 takes the unmasked EVEN_K path, as real model
    shapes do."""
    p, (qweight, scales, zeros) = _packed((n, k), group_size, symmetric=False)
    x = torch.randn(17, k, dtype=torch.float16, device=DEVICE)
    (_, bm, bn, bk, warps, stages), swap = GEMM_TILE_ROWS[tile]
    bk = min(bk, 128 if swap else group_size)
    grid = (plan.cdiv(17, bm), plan.cdiv(n, bn), 1)
    tiles = plan.GemmPlan(bm, bn, bk, warps, stages, 1, grid, swap=swap)
    y = gemm.w4a16_gemm(x, qweight, scales, zeros, group_size=group_size, plan=tiles)
    torch.testing.assert_close(y.float(), _reference(x, p), **ACCUM[torch.float16])


def test_swapped_gemm_plan_for_small_m():
    """Up to GEMM_SWAP_MAX_M rows the INT4 GEMM swaps its operands, with BLOCK_K free to span
    whole groups (group 32: 128); FP4 never does (its kernel has no swapped form)."""
    for m in (17, 32, 33, 64):
        p = plan.plan_gemm(m, 4096, 4096, 32, 132)
        assert p.swap and p.block_k == 128 and p.block_n >= 64, p
    assert not plan.plan_gemm(plan.GEMM_SWAP_MAX_M + 1, 4096, 4096, 32, 132).swap
    assert not plan.plan_fp4_gemm(32, 4096, 4096, 32, 132).swap
    assert plan.plan_gemm(32, 4096, 4096, 96, 132).block_k == 32  # 96: no power of two spans


TL_DTYPES = {torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}


def _run_packed_dequant_ptx(asm: str, regs: dict) -> list[torch.Tensor]:
    """gemv._dequant_asm's PTX interpreted (`ptx_interp.run_ptx`) on int64 tensors of 32-bit
    registers (the word, scale and offset pairs under their $ names). Returns t0..t3."""
    out = run_ptx(asm, regs)
    return [out[f"t{j}"] for j in range(4)]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_packed_dequant_ptx_is_the_rounded_reference(dtype):
    """The GEMM's (and GEMV's) packed PTX dequant, interpreted (the interpreter never runs
    inline PTX): t_j = (w(nibble j), w(nibble j + 4)) with w = round_dtype((code - zero) *
    scale) bit for bit, for every nibble in every position, every zero in [-8, 7], and scales
    across the dtype's range (subnormal, tiny, large: overflow to inf as the reference)."""
    big, tiny = (2.0**120, 2.0**-133) if dtype == torch.bfloat16 else (4096.0, 2.0**-24)
    scales = torch.tensor([1.0, -0.013671875, 0.0377, 2.0**-14, tiny, 3 * tiny, big, -big])
    scales = scales.to(dtype)
    words = torch.tensor([sum(((v + 3 * j) % 16) << (4 * j) for j in range(8)) for v in range(16)])
    s, z, w = torch.meshgrid(torch.arange(len(scales)), torch.arange(-8, 8), words, indexing="ij")
    s, z, w = s.flatten(), z.flatten(), w.flatten()
    magic = 0x4308 if dtype == torch.bfloat16 else 0x6408  # gemv._packed_consts
    regs = {"$4": w, "$5": bits16(scales[s]) * 0x10001, "$6": (z + magic) * 0x10001}
    t = _run_packed_dequant_ptx(gemv._dequant_asm(TL_DTYPES[dtype], 4, 5, 6), regs)
    for j in range(4):
        for half, nib in ((0, j), (1, j + 4)):
            code = ((w >> (4 * nib)) & 0xF) - 8 - z
            want = bits16((code.float() * scales[s].float()).to(dtype))
            assert torch.equal((t[j] >> (16 * half)) & 0xFFFF, want), (j, half)


@triton.jit
def _packed_tile_kernel(qbytes_ptr, scales_ptr, zeros_ptr, x_ptr, words_out, s2_out, c2_out,
                        t_ptr, w_out, x_out, k0, N, K, stride_qn, stride_sn, stride_zn,
                        GROUP_SIZE: tl.constexpr, HAS_ZEROS: tl.constexpr, EVEN_K: tl.constexpr,
                        STAGE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                        BLOCK_K: tl.constexpr):  # fmt: skip
    """STAGE 0: gemm.packed_operands of the tile at k0, stored [BN, BK/8] each; STAGE 1: the
    packed dequant's registers t [4, BN, BK/8] and x [BM, BK] in gemm's packed K order."""
    BKW: tl.constexpr = BLOCK_K // 8
    offs_n = tl.arange(0, BLOCK_N)
    at = offs_n[:, None] * BKW + tl.arange(0, BKW)[None, :]
    dtype: tl.constexpr = x_ptr.dtype.element_ty
    if STAGE == 0:
        words, s2, c2 = gemm.packed_operands(
            qbytes_ptr, scales_ptr, zeros_ptr, offs_n, k0, N, K, stride_qn, stride_sn,
            stride_zn, GROUP_SIZE, HAS_ZEROS, EVEN_K, dtype, BLOCK_N, BLOCK_K,
        )  # fmt: skip
        tl.store(words_out + at, tl.reshape(words, (BLOCK_N, BKW)))
        tl.store(s2_out + at, tl.reshape(s2, (BLOCK_N, BKW)))
        tl.store(c2_out + at, tl.reshape(c2, (BLOCK_N, BKW)))
    else:
        t0 = tl.load(t_ptr + at)
        t1 = tl.load(t_ptr + BLOCK_N * BKW + at)
        t2 = tl.load(t_ptr + 2 * BLOCK_N * BKW + at)
        t3 = tl.load(t_ptr + 3 * BLOCK_N * BKW + at)
        w = gemm.packed_k_order_w(t0, t1, t2, t3, dtype, BLOCK_N, BLOCK_K)
        offs_k = tl.arange(0, BLOCK_K)
        tl.store(w_out + offs_n[:, None] * BLOCK_K + offs_k[None, :], w)
        offs_m = tl.arange(0, BLOCK_M)
        x = tl.load(x_ptr + offs_m[:, None] * BLOCK_K + offs_k[None, :])
        x = gemm.packed_k_order_x(x, BLOCK_M, BLOCK_K)
        tl.store(x_out + offs_m[:, None] * BLOCK_K + offs_k[None, :], x)


def _packed_k_order(block_k: int) -> torch.Tensor:
    """gemm.packed_k_order_w's order: position 32 w' + 8 j + 2 t + e holds k = 8 (WPT t + w')
    + j + 4 e, WPT = block_k / 32."""
    wpt = block_k // 32
    w_, j, t, e = torch.meshgrid(torch.arange(wpt), torch.arange(4), torch.arange(4),
                                 torch.arange(2), indexing="ij")  # fmt: skip
    return (8 * (wpt * t + w_) + j + 4 * e).flatten()


@pytest.mark.skipif(DEVICE != "cpu", reason="the interpreter runs the packed path's Triton parts")
@pytest.mark.parametrize(
    ("k", "group_size", "block_k", "k0"),
    [(256, 32, 128, 128), (192, 64, 128, 128), (384, 128, 128, 256), (256, 16, 64, 64),
     (160, 32, 128, 128), (160, 32, 32, 128), (512, 256, 32, 288), (1024, 1024, 128, 896)],
)  # fmt: skip
@pytest.mark.parametrize(
    ("dtype", "scale_dtype"),
    [(torch.bfloat16, torch.bfloat16), (torch.float16, torch.bfloat16),
     (torch.float16, torch.float16)],
)  # fmt: skip
def test_packed_gemm_tile_is_the_dequantized_weight_in_one_k_order(k, group_size, block_k, k0,
                                                                   dtype, scale_dtype):  # fmt: skip
    """The swapped GEMM's packed path without a GPU: the interpreter runs its Triton code
    (operands, K order), the PTX between is interpreted (_run_packed_dequant_ptx). The tile
    equals dequantize(p, dtype=x.dtype)'s columns k0 + order bit for bit, x's tile x's columns
    in the same order (so the dot's sum over K is unchanged); rows past N and a K tail that
    ends mid-tile included (masked words read as 0, with x 0 there)."""
    n, bn, bm = 40, 64, 16
    p, (qweight, scales, zeros) = _packed((n, k), group_size, False, scale_dtype)
    ref = qatpass.dequantize(p, dtype=dtype)
    x = torch.randn(bm, block_k, dtype=dtype)
    bkw = block_k // 8
    words, s2, c2 = (torch.zeros(bn, bkw, dtype=torch.int32) for _ in range(3))
    t = torch.zeros(4, bn, bkw, dtype=torch.int32)
    w_l, x_l = torch.zeros(bn, block_k, dtype=dtype), torch.zeros_like(x)
    kw = dict(k0=k0, N=n, K=k, stride_qn=qweight.stride(0) * 4, stride_sn=scales.stride(0),
              stride_zn=zeros.stride(0), GROUP_SIZE=group_size, HAS_ZEROS=True,
              EVEN_K=k % block_k == 0, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=block_k)  # fmt: skip
    args = (qweight.view(torch.uint8), scales, zeros, x, words, s2, c2, t, w_l, x_l)
    _packed_tile_kernel[(1,)](*args, STAGE=0, **kw)
    regs = {
        f"${i}": r.to(torch.int64) & 0xFFFFFFFF
        for i, r in zip((4, 5, 6), (words, s2, c2), strict=True)
    }
    asm = gemv._dequant_asm(TL_DTYPES[dtype], 4, 5, 6)
    for j, tj in enumerate(_run_packed_dequant_ptx(asm, regs)):
        t[j] = tj.to(torch.int32)  # wraps to the register's bits
    _packed_tile_kernel[(1,)](*args, STAGE=1, **kw)
    order = _packed_k_order(block_k)
    assert sorted(order.tolist()) == list(range(block_k))
    assert torch.equal(x_l, x[:, order])
    cols = k0 + order
    live = cols < k
    assert torch.equal(bits16(w_l[:n, live]), bits16(ref[:, cols[live]]))
    assert torch.isfinite(w_l.float()).all()


def _check_gemv(y, x, p, bias=None):
    """The GEMV's numerics (gemv.py): weights rounded to x.dtype as `dequantize(p, x.dtype)`
    rounds them, exact products, fp32 sums. So y is within one output rounding of the float64
    product with those weights, plus 2^-20 of the sum of |products| (fp32 sums, any order)."""
    w = qatpass.dequantize(p, dtype=x.dtype).double().to(x.device)
    ref = x.double() @ w.T + (0.0 if bias is None else bias.double())
    magnitude = x.double().abs() @ w.abs().T
    ulp = {torch.bfloat16: 2**-8, torch.float16: 2**-11, torch.float32: 0.0}[x.dtype]
    err = (y.double() - ref).abs()
    bound = ref.abs() * ulp + magnitude * 2**-20 + 1e-30
    assert y.dtype == x.dtype and bool((err <= bound).all()), float((err - bound).max())


@pytest.mark.parametrize(
    ("n", "k", "group_size"),
    [(72, 256, 32), (40, 160, 32), (33, 1024, 128), (24, 192, -1), (16, 512, 8), (9, 96, 16)],
)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize(("symmetric", "with_bias"), [(True, False), (False, True)])
def test_gemv_exact_products_one_scale_per_group(n, k, group_size, dtype, symmetric, with_bias):
    """Odd N and K (masks), every group path: G < 32 (several groups per thread), G = 32,
    G = 128 (a tile within a group), per channel; zeros and bias."""
    p, (qweight, scales, zeros) = _packed((n, k), group_size, symmetric=symmetric)
    x = torch.randn(1, k, dtype=dtype, device=DEVICE)
    bias = torch.randn(n, dtype=dtype, device=DEVICE) if with_bias else None
    g = k if group_size == -1 else group_size
    _check_gemv(gemv.w4a16_gemv(x, qweight, scales, zeros, group_size=g, bias=bias), x, p, bias)


@pytest.mark.parametrize(("block_n", "block_k"), [(16, 512), (32, 256), (64, 128), (128, 32)])
@pytest.mark.parametrize("split_k", [1, 3])
def test_every_gemv_tile_is_correct(block_n, block_k, split_k):
    """Each tile the plan can pick, with several K steps per split (prefetch, unroll by 2 with
    a remainder step) and a split count that does not divide the steps."""
    from qatpass.kernels.triton.plan import gemv_tile_plan

    n, k = 48, 2560
    p, (qweight, scales, zeros) = _packed((n, k), 32, symmetric=False)
    x = torch.randn(1, k, dtype=torch.bfloat16, device=DEVICE)
    plan = gemv_tile_plan(1, n, k, block_n, block_k, split_k)
    y = gemv.w4a16_gemv(x, qweight, scales, zeros, group_size=32, plan=plan)
    _check_gemv(y, x, p)


def test_gemv_activations_off_a_4_byte_boundary():
    """x starting at an odd element (the tensor-core GEMV reads x as 32-bit pairs: the
    launcher realigns it) gives the same result as an aligned copy."""
    p, (qweight, scales, _) = _packed((N, 256), 32)
    base = torch.randn(1, 257, dtype=torch.bfloat16, device=DEVICE)
    x = base[:, 1:]
    assert x.storage_offset() % 2 == 1
    y = gemv.w4a16_gemv(x, qweight, scales, None, group_size=32)
    ref = gemv.w4a16_gemv(x.clone(), qweight, scales, None, group_size=32)
    torch.testing.assert_close(y, ref, **EXACT)
    torch.testing.assert_close(y.float(), _reference(x, p), **ACCUM[torch.bfloat16])


@pytest.mark.parametrize("m", [1, 20])
def test_k_in_whole_blocks_takes_the_unmasked_path(m):
    """K a multiple of every BLOCK_K (EVEN_K): the kernels drop the K masks, as on real
    model shapes."""
    p, (qweight, scales, zeros) = _packed((24, 1024), 128, symmetric=False)
    x = torch.randn(m, 1024, dtype=torch.bfloat16, device=DEVICE)
    y = w4a16_matmul(x, qweight, scales, zeros, group_size=128)
    torch.testing.assert_close(y.float(), _reference(x, p), **ACCUM[torch.bfloat16])


@pytest.mark.parametrize("m", [2, 5, 8, 9, 16])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize(
    ("n", "k", "group_size", "symmetric", "split_k"),
    [(40, 160, 32, True, 1), (33, 384, 128, False, 3)],
)
def test_gemv_several_rows_of_x(m, dtype, n, k, group_size, symmetric, split_k):
    """Batched decode (M = 2..GEMV_MAX_M) through the GEMV: odd N and K, zeros or not, bias,
    split-K; every row of x against x @ dequantize(p).T (the interpreter runs a program per
    row: gemv_mma is off, the plan is re-made one row a program)."""
    p, (qweight, scales, zeros) = _packed((n, k), group_size, symmetric=symmetric)
    x = torch.randn(m, k, dtype=dtype, device=DEVICE)
    x[m // 2] = 0  # a zero row among the others
    bias = None if symmetric else torch.randn(n, dtype=dtype, device=DEVICE)
    y = gemv.w4a16_gemv(x, qweight, scales, zeros, group_size=group_size, bias=bias,
                        split_k=split_k)  # fmt: skip
    _check_gemv(y, x, p, bias)


def test_gemv_several_rows_plan_falls_back_to_one_row_a_program():
    """A plan of 8 rows a program (plan_linear's on the tensor cores) where the tensor-core
    path is out (fp32 x; the interpreter) launches one program per row instead."""
    from qatpass.kernels.triton.common import capture_launches

    p, (qweight, scales, _) = _packed((N, 256), 32)
    x = torch.randn(5, 256, dtype=torch.float32, device=DEVICE)
    chosen = plan.plan_gemv(5, N, 256, 32, 132)
    assert chosen.block_m == 8 and chosen.grid[0] == 1
    with capture_launches(sms=132) as launches:
        gemv.w4a16_gemv(x, qweight, scales, None, group_size=32, plan=chosen)
    assert launches[0].kwargs["BLOCK_M"] == 1 and launches[0].grid[0] == 5
    y = gemv.w4a16_gemv(x, qweight, scales, None, group_size=32, plan=chosen)
    _check_gemv(y, x, p)


@pytest.mark.parametrize(("n", "k"), [(4096, 4096), (14336, 4096), (4096, 14336)])
@pytest.mark.parametrize("group_size", [32, 128])
def test_plan_linear_takes_the_gemv_up_to_gemv_max_m(n, k, group_size):
    """On the tensor cores every M <= GEMV_MAX_M runs the GEMV, x rows in the mma's B columns
    (8 rows a program up to M = 8, 16 above), the grid sized from the real M (>= 2 waves at
    GEMV_OCCUPANCY or one K step per split); the GEMM from GEMV_MAX_M + 1. Without the tensor
    cores (fp32 x or scales, the interpreter) or their tile the GEMV keeps M = 1."""
    assert GEMV_MAX_M == 16
    for m in range(1, GEMV_MAX_M + 1):
        chosen = plan.plan_linear(m, n, k, group_size, 132)
        assert chosen.kernel == "gemv" and chosen.block_k == plan.GEMV_MMA_BLOCK_K, m
        assert chosen.block_m == (1 if m == 1 else 8 if m <= 8 else 16)
        assert chosen.grid[0] == plan.cdiv(m, chosen.block_m)
        ctas = chosen.grid[0] * chosen.grid[1] * chosen.grid[2]
        assert ctas >= plan.GEMV_WAVES * plan.GEMV_OCCUPANCY * 132 or chosen.steps == 1
    assert plan.plan_linear(GEMV_MAX_M + 1, n, k, group_size, 132).kernel == "gemm"
    assert plan.plan_linear(2, n, k, group_size, 132, mma=False).kernel == "gemm"
    assert plan.plan_linear(1, n, k, group_size, 132, mma=False).kernel == "gemv"
    assert plan.plan_linear(4, n, k, 16, 132).kernel == "gemm"  # BLOCK_K 512: no mma tile


def test_gemv_gemm_boundary():
    p, (qweight, scales, _) = _packed((N, 64), 32)
    for m in (GEMV_MAX_M, GEMV_MAX_M + 1):
        x = torch.randn(m, 64, dtype=torch.bfloat16, device=DEVICE)
        y = w4a16_matmul(x, qweight, scales, group_size=32)
        torch.testing.assert_close(y.float(), _reference(x, p), **ACCUM[torch.bfloat16])


# ---- grouped (MoE) ----


def _grouped_reference(x, p, expert_ids, bias=None):
    w = qatpass.dequantize(p, dtype=x.dtype).float().to(x.device)  # [E, N, K]
    ref = torch.stack([x[t].float() @ w[e].T for t, e in enumerate(expert_ids.tolist())])
    return ref if bias is None else ref + bias[expert_ids].float()


@pytest.mark.parametrize("t", [1, 5, 17])
@pytest.mark.parametrize(
    ("symmetric", "group_size", "dtype", "with_bias", "id_dtype"),
    [
        (True, 32, torch.bfloat16, True, torch.int64),
        (False, 64, torch.float16, False, torch.int32),
        (False, 32, torch.bfloat16, True, torch.int32),
    ],
)
def test_grouped_matches_per_row_reference(t, symmetric, group_size, dtype, with_bias, id_dtype):
    e, n, k = 4, 40, 192
    p, (qweight, scales, zeros) = _packed((e, n, k), group_size, symmetric)
    assert qweight.shape == (e, n, k // 8)
    x = torch.randn(t, k, dtype=dtype, device=DEVICE)
    expert_ids = torch.randint(0, e, (t,), dtype=id_dtype, device=DEVICE)  # unsorted
    bias = torch.randn(e, n, dtype=dtype, device=DEVICE) if with_bias else None
    y = w4a16_grouped_matmul(
        x, qweight, scales, zeros, expert_ids=expert_ids, group_size=group_size, bias=bias
    )
    assert y.shape == (t, n) and y.dtype == dtype
    ref = _grouped_reference(x, p, expert_ids, bias)
    torch.testing.assert_close(y.float(), ref, **ACCUM[dtype])


def test_grouped_k_in_whole_blocks():
    p, (qweight, scales, _) = _packed((2, 16, 1024), 32)
    x = torch.randn(3, 1024, dtype=torch.float16, device=DEVICE)
    ids = torch.tensor([1, 0, 1], device=DEVICE)
    y = w4a16_grouped_matmul(x, qweight, scales, expert_ids=ids, group_size=32)
    torch.testing.assert_close(y.float(), _grouped_reference(x, p, ids), **ACCUM[torch.float16])


def test_grouped_every_autotune_config_is_correct(monkeypatch):
    p, (qweight, scales, _) = _packed((3, 24, 128), 32)
    x = torch.randn(4, 128, dtype=torch.float16, device=DEVICE)
    ids = torch.tensor([2, 0, 2, 1], device=DEVICE)
    ref = _grouped_reference(x, p, ids)
    for config in grouped.GROUPED_CONFIGS:
        monkeypatch.setattr(grouped, "grouped_config", lambda *args, c=config: c)
        y = w4a16_grouped_matmul(x, qweight, scales, expert_ids=ids, group_size=32)
        torch.testing.assert_close(y.float(), ref, **ACCUM[torch.float16], msg=str(config))


def test_grouped_bad_expert_id_reads_nothing_and_gives_nan():
    """The in-kernel guard used on GPU, where ids are not checked on the host."""
    _, (qweight, scales, _) = _packed((2, 16, 64), 32)
    x = torch.randn(3, 64, dtype=torch.float16, device=DEVICE)
    ids = torch.tensor([0, 7, -1], dtype=torch.int32, device=DEVICE)
    y = grouped.w4a16_grouped(x, qweight, scales, None, expert_ids=ids, group_size=32)
    assert torch.isfinite(y[0]).all() and torch.isnan(y[1:]).all()


# ---- refusals ----


def _good_args():
    _, (qweight, scales, zeros) = _packed((16, 64), 32, symmetric=False)
    x = torch.randn(2, 64, dtype=torch.bfloat16, device=DEVICE)
    bias = torch.randn(16, dtype=torch.bfloat16, device=DEVICE)
    return {"x": x, "qweight": qweight, "scales": scales, "zeros": zeros, "bias": bias}


BAD_DENSE = [
    ("x", lambda a: a["x"].to(torch.int32), TypeError, "x must be float16"),
    ("x", lambda a: a["x"].double(), TypeError, "x must be float16"),
    ("qweight", lambda a: a["qweight"].view(torch.uint8), TypeError, "qweight must be int32"),
    ("qweight", lambda a: a["qweight"][None], ValueError, r"qweight must be \[N, K/8\]"),
    ("x", lambda a: a["x"][:, :56], ValueError, "x has K=56"),
    ("scales", lambda a: a["scales"].to(torch.int8), TypeError, "scales must be float16"),
    ("scales", lambda a: a["scales"][:, :1], ValueError, "scales must have shape"),
    ("scales", lambda a: a["scales"].T, ValueError, "scales must have shape"),
    ("zeros", lambda a: a["zeros"].int(), TypeError, "zeros must be int8"),
    ("zeros", lambda a: a["zeros"][:8], ValueError, "zeros must have shape"),
    ("bias", lambda a: a["bias"][:8], ValueError, "bias must have shape"),
    ("bias", lambda a: a["bias"].int(), TypeError, "bias must be float16"),
    ("x", lambda a: a["x"].float().numpy(), TypeError, "x must be a torch.Tensor"),
]


@pytest.mark.parametrize(("name", "make", "error", "match"), BAD_DENSE)
def test_matmul_refuses_bad_input(name, make, error, match):
    args = _good_args()
    args[name] = make(args)
    with pytest.raises(error, match=match):
        w4a16_matmul(
            args["x"], args["qweight"], args["scales"], args["zeros"], group_size=32,
            bias=args["bias"],
        )  # fmt: skip


@pytest.mark.parametrize(
    ("group_size", "error", "match"),
    [(48, ValueError, "not divisible by group_size 48"), (0, ValueError, "group_size must be"),
     (-2, ValueError, "group_size must be"), (32.0, TypeError, "group_size must be an int"),
     (True, TypeError, "group_size must be an int"), (4, ValueError, "multiple of 8")],
)  # fmt: skip
def test_matmul_refuses_bad_group_size(group_size, error, match):
    a = _good_args()
    with pytest.raises(error, match=match):
        w4a16_matmul(a["x"], a["qweight"], a["scales"], group_size=group_size)


def test_matmul_refuses_wrong_group_size_for_scales():
    a = _good_args()  # scales are for group_size 32
    with pytest.raises(ValueError, match="scales must have shape"):
        w4a16_matmul(a["x"], a["qweight"], a["scales"], group_size=64)


@pytest.mark.skipif(DEVICE != "cpu", reason="device mismatch is built from a CPU and a meta tensor")
def test_matmul_refuses_mixed_devices():
    a = _good_args()
    with pytest.raises(ValueError, match="scales is on meta"):
        w4a16_matmul(a["x"], a["qweight"], a["scales"].to("meta"), group_size=32)


@pytest.mark.skipif(DEVICE != "cpu", reason="CPU refusal")
def test_cpu_without_interpreter_is_refused(monkeypatch):
    a = _good_args()
    monkeypatch.delenv("TRITON_INTERPRET")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        w4a16_matmul(a["x"], a["qweight"], a["scales"], group_size=32)


def _grouped_args():
    _, (qweight, scales, zeros) = _packed((3, 16, 64), 32, symmetric=False)
    x = torch.randn(4, 64, dtype=torch.float16, device=DEVICE)
    ids = torch.tensor([0, 2, 1, 2], device=DEVICE)
    return {"x": x, "qweight": qweight, "scales": scales, "zeros": zeros, "expert_ids": ids}


BAD_GROUPED = [
    (
        "expert_ids",
        lambda a: a["expert_ids"].float(),
        TypeError,
        "expert_ids must be a 1-d int32/int64",
    ),
    ("expert_ids", lambda a: a["expert_ids"][:3], ValueError, "3 expert ids for 4 rows"),
    ("expert_ids", lambda a: a["expert_ids"].tolist(), TypeError, "expert_ids must be a torch"),
    ("expert_ids", lambda a: a["expert_ids"] + 1, ValueError, r"must lie in \[0, 3\)"),
    ("expert_ids", lambda a: a["expert_ids"] - 1, ValueError, r"must lie in \[0, 3\)"),
    ("x", lambda a: a["x"][None], ValueError, r"x must be \[T, K\]"),
    ("qweight", lambda a: a["qweight"][0], ValueError, r"qweight must be \[E, N, K/8\]"),
    ("scales", lambda a: a["scales"][:2], ValueError, "scales must have shape"),
    ("zeros", lambda a: a["zeros"][:, :8], ValueError, "zeros must have shape"),
]


@pytest.mark.parametrize(("name", "make", "error", "match"), BAD_GROUPED)
def test_grouped_refuses_bad_input(name, make, error, match):
    a = _grouped_args()
    a[name] = make(a)
    with pytest.raises(error, match=match):
        w4a16_grouped_matmul(
            a["x"], a["qweight"], a["scales"], a["zeros"], expert_ids=a["expert_ids"],
            group_size=32,
        )  # fmt: skip


def test_grouped_refuses_bias_of_wrong_shape():
    a = _grouped_args()
    with pytest.raises(ValueError, match=r"bias must have shape \(3, 16\)"):
        w4a16_grouped_matmul(
            a["x"], a["qweight"], a["scales"], expert_ids=a["expert_ids"], group_size=32,
            bias=torch.zeros(16, device=DEVICE),
        )  # fmt: skip


# ---- launch choices ----


@pytest.mark.parametrize(
    ("m", "n", "k", "group_size", "kernel", "block_m", "split_k"),
    [
        (1, 4096, 4096, 32, "gemv", 1, 32),
        (1, 14336, 4096, 128, "gemv", 1, 16),
        (8, 4096, 4096, 32, "gemv", 8, 32),  # x rows in the mma's B columns
        (16, 4096, 4096, 32, "gemv", 16, 32),
        (17, 4096, 4096, 32, "gemm", 32, 8),  # swapped, 128 weight rows a program
        (64, 4096, 4096, 128, "gemm", 64, 8),
        (512, 14336, 4096, 32, "gemm", 128, 1),
    ],
)
def test_plan_follows_the_real_shapes(m, n, k, group_size, kernel, block_m, split_k):
    """The launch plan for an H200 (132 SMs): GEMV up to M = 16 (GEMV_MAX_M), the GEMM tile
    grows with M, and split-K fills the SMs from the real tile."""
    chosen = plan.plan_linear(m, n, k, group_size, 132)
    assert chosen.kernel == kernel and chosen.split_k == split_k
    assert getattr(chosen, "block_m", None) == block_m
    grid = chosen.grid[0] * chosen.grid[1] * chosen.grid[2]
    assert grid >= 132 or chosen.split_k > 1


def test_gemv_block_k_tiles_whole_groups():
    """The tensor-core tile (BLOCK_K 128) wherever it tiles whole groups; else the widest
    power of two that does."""
    assert [plan.gemv_block_k(4096, g) for g in (8, 16, 32, 128, 4096)] == [512, 512, 128, 128, 128]
    assert plan.gemv_block_k(160, 160) == 32 and plan.gemv_block_k(96, 32) == 128
    assert plan.gemv_block_k(64, 32) == 64


@pytest.mark.parametrize(("n", "k"), [(4096, 4096), (4096, 14336), (14336, 4096), (8192, 28672)])
@pytest.mark.parametrize("group_size", [32, 128])
def test_gemv_plan_fills_an_h200(n, k, group_size):
    """Every benchmark shape at M = 1: the tensor-core tile, >= 2 waves of CTAs at
    GEMV_OCCUPANCY (or one K step per split), every split with a K step, the splits covering K."""
    chosen = plan.plan_gemv(1, n, k, group_size, 132)
    assert (chosen.block_n, chosen.block_k) == (128, plan.GEMV_MMA_BLOCK_K)
    ctas = chosen.grid[0] * chosen.grid[1] * chosen.grid[2]
    assert ctas >= plan.GEMV_WAVES * plan.GEMV_OCCUPANCY * 132 or chosen.steps == 1
    assert (chosen.split_k - 1) * chosen.steps < chosen.k_steps <= chosen.split_k * chosen.steps


def test_grouped_pruning_keeps_block_k_within_the_group():
    args = {"N": 4096, "K": 4096, "GROUP_SIZE": 32}
    kept = grouped.prune_grouped_configs(grouped.GROUPED_CONFIGS, args)
    assert kept and all(c.kwargs["BLOCK_K"] <= 32 for c in kept)


TRACE_SCRIPT = textwrap.dedent(
    """
    import torch, qatpass
    from torch.fx.experimental.proxy_tensor import make_fx
    from qatpass.kernels.triton.gemm import w4a16_gemm
    from qatpass.kernels.triton.gemv import w4a16_gemv
    from qatpass.kernels.triton.grouped import w4a16_grouped

    p = qatpass.quantize(torch.randn(40, 1024), qatpass.Int4Scheme())
    pe = qatpass.quantize(torch.randn(3, 40, 1024), qatpass.Int4Scheme())
    b = torch.randn(40, dtype=torch.bfloat16)
    for launch, m in ((w4a16_gemv, 1), (w4a16_gemv, 3), (w4a16_gemm, 20)):
        x = torch.randn(m, 1024, dtype=torch.bfloat16)
        f = lambda x, q, s, b: launch(x, q, s, None, group_size=32, bias=b, split_k=2)
        code = make_fx(f, tracing_mode="fake")(x, p.qweight, p.scales, b).code
        assert code.count("higher_order.triton_kernel_wrapper") == 2, code
    f = lambda x, q, s, i: w4a16_grouped(x, q, s, None, expert_ids=i, group_size=32)
    ids = torch.tensor([2, 0, 1])
    code = make_fx(f, tracing_mode="fake")(x[:3], pe.qweight, pe.scales, ids).code
    assert code.count("higher_order.triton_kernel_wrapper") == 1, code
    print("traced")
    """
)


@pytest.mark.skipif(DEVICE != "cpu", reason="the CUDA run traces through the real op elsewhere")
def test_launchers_trace_through_wrap_triton():
    """Without the interpreter, wrap_triton makes each launch a traceable higher-order op.

    (Under TRITON_INTERPRET=1 wrap_triton hands back the kernel itself, so this runs in a fresh
    interpreter-free process; fake tensors mean no kernel runs, so no GPU is needed.)
    """
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["QATPASS_TEST_CUDA"] = "1"
    done = subprocess.run(
        [sys.executable, "-c", TRACE_SCRIPT], env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0 and "traced" in done.stdout, done.stderr[-3000:]


COMPILE_SCRIPT = textwrap.dedent(
    """
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.runtime.autotuner import Autotuner
    from qatpass.kernels.triton import (dequant_matmul, gemm, gemv, grouped, grouped_gemm,
                                        splitk_reduce)

    POINTERS = {
        "x_ptr": "*bf16", "qweight_ptr": "*i32", "qbytes_ptr": "*u8", "scales_ptr": "*bf16",
        "zeros_ptr": "*i8", "bias_ptr": "*bf16", "out_ptr": "*bf16", "expert_ids_ptr": "*i64",
        "partials_ptr": "*fp32",
    }

    def compile_for_sm90(kernel, constexprs, config=None):
        fn = kernel.fn if isinstance(kernel, Autotuner) else kernel
        meta = {**constexprs, **(config.kwargs if config else {})}
        sig = {a: "constexpr" if a in meta else POINTERS.get(a, "i32") for a in fn.arg_names}
        attrs = {(i,): [["tt.divisibility", 16]] for i, a in enumerate(fn.arg_names) if a in POINTERS}
        opts = {"num_warps": config.num_warps, "num_stages": config.num_stages} if config else {}
        src = ASTSource(fn=fn, signature=sig, constexprs=meta, attrs=attrs)
        triton.compile(src, target=GPUTarget("cuda", 90, 32), options=opts)

    common = {"GROUP_SIZE": 32, "HAS_ZEROS": True, "HAS_BIAS": True, "INTERPRET": False}
    gemv_meta = {"EVEN_N": False, "UNROLL": 2, "BLOCK_N": 32, "BLOCK_K": 512, "BLOCK_M": 1}
    compile_for_sm90(gemv.w4a16_gemv_kernel,
                     {**common, "SPLIT_K": 1, "EVEN_K": True, **gemv_meta})
    mma_meta = {**gemv_meta, "BLOCK_N": 128, "BLOCK_K": 128}  # the tensor-core GEMV
    compile_for_sm90(gemv.w4a16_gemv_kernel, {**common, "SPLIT_K": 4, "EVEN_K": False, **mma_meta})
    for rows in (8, 16):  # x rows in the mma's B columns (batched decode)
        compile_for_sm90(gemv.w4a16_gemv_kernel,
                         {**common, "SPLIT_K": 2, "EVEN_K": False, **mma_meta, "BLOCK_M": rows})
    for x_dtype, s_dtype in (("*fp16", "*bf16"), ("*fp32", "*bf16"), ("*bf16", "*fp32")):
        POINTERS.update(x_ptr=x_dtype, scales_ptr=s_dtype)  # the other GEMV paths at that tile
        compile_for_sm90(gemv.w4a16_gemv_kernel, {**common, "SPLIT_K": 1, "EVEN_K": True, **mma_meta})
    POINTERS.update(x_ptr="*bf16", scales_ptr="*bf16")
    for swap, bm, bn, bk in ((False, 64, 128, 32), (True, 32, 64, 128)):  # swapped: 4 groups
        compile_for_sm90(gemm.w4a16_gemm_kernel,
                         {**common, "SPLIT_K": 2, "EVEN_K": False, "DOT_FP32": False,
                          "SWAP": swap, "BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk})
    # swapped: the packed dequant on fp16 x (bf16 scales), at BLOCK_K 32 and in one group;
    # the fp32 form for fp32 scales
    swapped = {**common, "SPLIT_K": 1, "DOT_FP32": False, "SWAP": True, "BLOCK_M": 64,
               "BLOCK_N": 128}
    for x_dtype, s_dtype, bk, group, even in (("*fp16", "*bf16", 128, 128, True),
                                              ("*bf16", "*bf16", 32, 128, False),
                                              ("*bf16", "*fp32", 128, 32, False)):
        POINTERS.update(x_ptr=x_dtype, scales_ptr=s_dtype, out_ptr=x_dtype)
        compile_for_sm90(gemm.w4a16_gemm_kernel,
                         {**swapped, "GROUP_SIZE": group, "EVEN_K": even, "BLOCK_K": bk})
    POINTERS.update(x_ptr="*bf16", scales_ptr="*bf16", out_ptr="*bf16")
    compile_for_sm90(gemv.w4a16_gemv_kernel,
                     {**common, "GROUP_SIZE": 128, "SPLIT_K": 2, "EVEN_K": False, **gemv_meta})
    compile_for_sm90(grouped.w4a16_grouped_kernel, {**common, "EVEN_K": False},
                     grouped.GROUPED_CONFIGS[0])
    POINTERS.update({f"{name}_ptr": "*i64" for name in ("order", "tile_expert", "tile_row0",
                                                        "tile_row_end")})
    for bm, bn, bk in ((16, 128, 32), (64, 128, 64)):
        compile_for_sm90(grouped_gemm.w4a16_grouped_gemm_kernel,
                         {**common, "EVEN_K": False, "DOT_FP32": False, "BLOCK_M": bm,
                          "BLOCK_N": bn, "BLOCK_K": bk})
    compile_for_sm90(dequant_matmul.w4a16_dequant_kernel,
                     {"GROUP_SIZE": 128, "HAS_ZEROS": True, "INTERPRET": False,
                      "BLOCK_N": 32, "BLOCK_K": 128})
    compile_for_sm90(splitk_reduce.splitk_reduce_kernel,
                     {"SPLIT_K": 4, "HAS_BIAS": True, "INTERPRET": False, "BLOCK": 1024})
    print("compiled")
    """
)


@pytest.mark.skipif(
    DEVICE != "cpu" or importlib.util.find_spec("triton.backends.nvidia") is None,
    reason="a CUDA run compiles the kernels for real anyway",
)
def test_kernels_compile_for_hopper_without_a_gpu():
    """The interpreter never runs Triton's compiler; compile each kernel family for sm_90
    (through ptxas, no GPU needed) so errors only the real compiler sees show up on CPU CI."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["QATPASS_TEST_CUDA"] = "1"
    done = subprocess.run(
        [sys.executable, "-c", COMPILE_SCRIPT], env=env, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0 and "compiled" in done.stdout, done.stderr[-3000:]


# ---- run-time M under tracing ----


def _launched(fn, *args) -> list[tuple[str, dict]]:
    """(kernel name, meta) of each launch `fn(*args)` makes, captured, not run (132 SMs)."""
    from qatpass.kernels.triton.common import capture_launches

    with capture_launches(sms=132) as launches:
        fn(*args)
    return [(getattr(c.kernel, "__name__", ""), c.kwargs) for c in launches]


@pytest.mark.parametrize("how", ["make_fx", "torch.compile"])
def test_graph_traced_at_m16_plans_from_the_real_m(how):
    """A graph traced with M = 16 (dynamic) launches the dequantize + cuBLAS path at
    DEQUANT_MATMUL_MIN_M, the large-M GEMM tile at M = 512 and the GEMV at M = 1: the plan is
    made in the op body at run time, not from the trace's hint."""
    from torch.fx.experimental.proxy_tensor import make_fx

    _, (qweight, scales, zeros) = _packed((256, 512), 32)

    def f(x, q, s):
        return w4a16_matmul(x, q, s, group_size=32)

    x16 = torch.randn(16, 512, dtype=torch.bfloat16, device=DEVICE)
    if how == "make_fx":
        graph = make_fx(f, tracing_mode="symbolic")(x16, qweight, scales)
        assert "w4a16_matmul_triton" in graph.code
    else:
        graph = torch.compile(f, backend="aot_eager", dynamic=True, fullgraph=True)
        graph(x16, qweight, scales)
    for m, kernel, block_m in ((plan.DEQUANT_MATMUL_MIN_M, "w4a16_dequant_kernel", None),
                               (512, "w4a16_gemm_kernel", 128), (16, "w4a16_gemm_kernel", 16),
                               (1, "w4a16_gemv_kernel", 1)):  # fmt: skip
        x = torch.randn(m, 512, dtype=torch.bfloat16, device=DEVICE)
        (name, meta), *_ = _launched(graph, x, qweight, scales)
        assert name == kernel and meta.get("BLOCK_M") == block_m, (m, name, meta.get("BLOCK_M"))
        if "x_ptr" in meta:
            assert meta["x_ptr"].shape[0] == m
