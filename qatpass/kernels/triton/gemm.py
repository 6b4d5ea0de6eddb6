"""W4A16 tiled GEMM (M >= 2, prefill and small batches): tensor-core `tl.dot`, optional split-K.

Each program computes a [BLOCK_M, BLOCK_N] output tile and dequantizes its weight tile in
registers per K step, rounded to the activation dtype as `qatpass.dequantize(p, dtype=x.dtype)`
rounds it, then feeds the tensor cores with fp32 accumulation. Two operand orders
(`plan.plan_gemm` picks by the real M):

- SWAP (M <= plan.GEMM_SWAP_MAX_M): the dot is w [BLOCK_N, BLOCK_K] @ x.T [BLOCK_K, BLOCK_M],
  out.T per program: the weight rows are the wide side (Hopper's wgmma takes the A operand,
  the dequantized weight, straight from registers, M 64 a warpgroup) and x's few rows the
  narrow N. BLOCK_K may span several groups (one scale per row and group, broadcast over the
  group). With 16-bit x and scales exact in x's dtype (PACKED, as the GEMV's tensor-core
  path: gemv.gemv_mma) the tile is read as int32 words and dequantised by the GEMV's packed
  16-bit PTX (`load_dequant_packed`: per word of 8 weights 4 LOP3 + 3 shifts + 4 packed sub
  + 4 packed mul, no fp32 and no cast), whose bf16x2 / f16x2 registers pair weights
  (j, j + 4) of a word. The dot sums over K, so instead of moving those halves the K order of
  the tile is permuted (`packed_k_order_w`: each register is a wgmma A pair as it is, each
  lane's pairs its own words) and x's tile takes the same permutation (`packed_k_order_x`,
  on its way to the B operand in shared memory): 3.0-3.3 instructions per weight in the main
  loop at M <= 32, 4.2-4.6 at M = 64 (static, sm_90; 6.2-7.6 in the fp32 form). Otherwise
  (fp32 scales, fp16 scales on bf16 x, fp32 x, the interpreter: it runs no inline PTX) the
  tile is read row by row as bytes (`load_dequant_rows`), fp32 (code - zero) * scale, cast.
- Otherwise x [BLOCK_M, BLOCK_K] @ w.T [BLOCK_K, BLOCK_N] (`load_dequant`, BLOCK_K inside one
  group; fp32 math and a cast).

Numerics. Every product is of the same rounded weight and x, exact in fp32, whichever operand
order and K order: only the fp32 summation order differs. The packed dequant gives the same
rounded weights as fp32-then-cast (the exact product of a 5-bit integer code and a 16-bit
scale, rounded once; gemv.py's module docstring has the argument and its one caveat, bf16
scales below 2**-17 on fp16 x). DOT_FP32 upcasts both operands to fp32 instead: the Triton
interpreter computes bf16 dots wrongly, and fp32 activations must not drop to TF32.
Tile, warps, stages and split-K come from `plan.plan_gemm` on the real M (no autotuning, so
nothing is benchmarked inside a CUDA-graph capture).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from qatpass.kernels.triton.common import (
    cast_rne,
    dot_acc,
    interpreting,
    launch,
    load_dequant,
    load_dequant_rows,
    num_sms,
    use_fp32_dot,
)
from qatpass.kernels.triton.gemv import _dequant_asm, _packed_consts
from qatpass.kernels.triton.plan import GemmPlan, plan_gemm
from qatpass.kernels.triton.splitk_reduce import splitk_output, splitk_reduce


@triton.jit
def w4a16_gemm_kernel(
    # tensors
    x_ptr,  # fp16/bf16/fp32 [M, K]
    qbytes_ptr,  # uint8 [N, K/2]: qweight's bytes, nibble k % 2 of byte k // 2 (low = even k)
    scales_ptr,  # fp16/bf16/fp32 [N, K/G]
    zeros_ptr,  # int8 [N, K/G] signed zero-point codes, or None
    bias_ptr,  # [N] or None (added in the reduce kernel when SPLIT_K > 1)
    out_ptr,  # x.dtype [M, N] when SPLIT_K == 1, else fp32 partials [SPLIT_K, M, N]
    # sizes
    M,
    N,
    K,
    # strides (elements)
    stride_xm,
    stride_xk,
    stride_qn,  # bytes
    stride_sn,
    stride_zn,
    stride_om,
    stride_on,
    stride_os,
    # meta
    GROUP_SIZE: tl.constexpr,
    HAS_ZEROS: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    SPLIT_K: tl.constexpr,
    EVEN_K: tl.constexpr,  # K % BLOCK_K == 0: no mask along K
    DOT_FP32: tl.constexpr,
    INTERPRET: tl.constexpr,  # Triton interpreter: one config, bf16 rounding done by hand
    SWAP: tl.constexpr,  # weight rows as the dot's M (small M: plan.GemmPlan.swap)
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """out = x @ w.T tile by tile; grid (M/BLOCK_M, N/BLOCK_N, SPLIT_K), M fastest so that
    programs running together share (L2-resident) weight tiles."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_k = tl.program_id(2)
    offs_m = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M

    k_blocks = tl.cdiv(K, BLOCK_K)
    per_split = tl.cdiv(k_blocks, SPLIT_K)
    kb_start = pid_k * per_split
    kb_end = tl.minimum(kb_start + per_split, k_blocks)

    # SWAP with 16-bit x and scales exact in x's dtype (as gemv.gemv_mma): the packed dequant
    # (load_dequant_packed), weights and x in its K order; otherwise fp32 math and a cast.
    X_TY: tl.constexpr = x_ptr.dtype.element_ty
    S_TY: tl.constexpr = scales_ptr.dtype.element_ty
    PACKED: tl.constexpr = (
        SWAP and not DOT_FP32 and not INTERPRET and BLOCK_K >= 32
        and (S_TY == X_TY or (X_TY == tl.float16 and S_TY == tl.bfloat16))
    )  # fmt: skip
    if SWAP:
        acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for kb in range(kb_start, kb_end):
        k0 = kb * BLOCK_K
        offs_k = k0 + tl.arange(0, BLOCK_K)
        x_tile = tl.load(
            x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk,
            mask=mask_m[:, None] if EVEN_K else mask_m[:, None] & (offs_k[None, :] < K),
            other=0.0,
        )
        if PACKED:
            # Small M, swapped (acc is out.T), the weight tile rounded to x's dtype by the
            # packed dequant; the dot sums over K, so x takes the same permutation of K.
            w = load_dequant_packed(
                qbytes_ptr, scales_ptr, zeros_ptr, offs_n, k0, N, K, stride_qn, stride_sn,
                stride_zn, GROUP_SIZE, HAS_ZEROS, EVEN_K, X_TY, BLOCK_N, BLOCK_K,
            )  # fmt: skip
            acc = dot_acc(w, tl.trans(packed_k_order_x(x_tile, BLOCK_M, BLOCK_K)), acc, DOT_FP32)
        else:
            if SWAP:
                # Small M: the weight rows are the dot's wide side (its M, the tensor cores' A
                # operand, dequantised in registers), x's rows its narrow N: acc is out.T.
                w = load_dequant_rows(
                    qbytes_ptr, scales_ptr, zeros_ptr, offs_n, k0, N, K, stride_qn, stride_sn,
                    stride_zn, GROUP_SIZE=GROUP_SIZE, HAS_ZEROS=HAS_ZEROS, EVEN_K=EVEN_K,
                    BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K,
                )  # fmt: skip
            else:
                w = load_dequant(
                    qbytes_ptr, scales_ptr, zeros_ptr, offs_n, k0, N, K, stride_qn, stride_sn,
                    stride_zn, GROUP_SIZE=GROUP_SIZE, HAS_ZEROS=HAS_ZEROS, EVEN_K=EVEN_K,
                    BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K,
                )  # fmt: skip
            # Round to the activation dtype exactly as dequantize(p, dtype=x.dtype) does.
            w = cast_rne(w, X_TY, INTERPRET)
            if SWAP:
                acc = dot_acc(w, tl.trans(x_tile), acc, DOT_FP32)
            else:
                acc = dot_acc(x_tile, w, acc, DOT_FP32)
    if SWAP:
        acc = tl.trans(acc)

    mask = mask_m[:, None] & (offs_n[None, :] < N)
    if SPLIT_K == 1:
        if HAS_BIAS:
            acc += tl.load(bias_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]
        out = out_ptr + offs_m[:, None] * stride_om + offs_n[None, :] * stride_on
        tl.store(out, cast_rne(acc, out_ptr.dtype.element_ty, INTERPRET), mask=mask)
    else:
        out = (
            out_ptr + pid_k * stride_os + offs_m[:, None] * stride_om + offs_n[None, :] * stride_on
        )
        tl.store(out, acc, mask=mask)


@triton.jit
def load_dequant_packed(
    qbytes_ptr,  # uint8 [N, K/2]: the bytes of int32 qweight [N, K/8], read as its words
    scales_ptr,  # 16-bit [N, K/G], exact in DTYPE
    zeros_ptr,  # int8 [N, K/G] or None
    offs_n,  # [BLOCK_N] weight rows
    k0,  # first k of the tile, a multiple of BLOCK_K
    N,
    K,
    stride_qn,  # bytes per row of qbytes (a multiple of 4: whole words)
    stride_sn,
    stride_zn,
    GROUP_SIZE: tl.constexpr,
    HAS_ZEROS: tl.constexpr,
    EVEN_K: tl.constexpr,  # K % BLOCK_K == 0: no mask along K
    DTYPE: tl.constexpr,  # x's dtype, bf16 / fp16
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,  # a power of 2, >= 32
):
    """DTYPE [BLOCK_N, BLOCK_K] tile of w, round_DTYPE((code - zero) * scale), in the packed K
    order (packed_k_order_w); finite outside [N, K] (x is 0 there, and those rows unstored).

    The words and their constant pairs (packed_operands) go through the GEMV's packed 16-bit
    PTX (gemv._dequant_asm: per word 4 LOP3 + 3 shifts + 4 packed sub + 4 packed mul, exact:
    see gemv's numerics), whose pairs packed_k_order_w lays out for the dot."""
    words, s2, c2 = packed_operands(
        qbytes_ptr, scales_ptr, zeros_ptr, offs_n, k0, N, K, stride_qn, stride_sn, stride_zn,
        GROUP_SIZE, HAS_ZEROS, EVEN_K, DTYPE, BLOCK_N, BLOCK_K,
    )  # fmt: skip
    asm: tl.constexpr = (
        "{ .reg .b32 t0, t1, t2, t3, u;"
        + _dequant_asm(DTYPE, 4, 5, 6)
        + "mov.b32 $0, t0; mov.b32 $1, t1; mov.b32 $2, t2; mov.b32 $3, t3; }"
    )
    t0, t1, t2, t3 = tl.inline_asm_elementwise(
        asm, "=r,=r,=r,=r,r,r,r", [words, s2, c2], dtype=(tl.int32,) * 4, is_pure=True, pack=1,
    )  # fmt: skip
    return packed_k_order_w(t0, t1, t2, t3, DTYPE, BLOCK_N, BLOCK_K)


@triton.jit
def packed_operands(qbytes_ptr, scales_ptr, zeros_ptr, offs_n, k0, N, K, stride_qn, stride_sn,
                    stride_zn, GROUP_SIZE: tl.constexpr, HAS_ZEROS: tl.constexpr,
                    EVEN_K: tl.constexpr, DTYPE: tl.constexpr, BLOCK_N: tl.constexpr,
                    BLOCK_K: tl.constexpr):  # fmt: skip
    """(words, scale pairs, offset pairs), int32 [BLOCK_N, NG, BLOCK_K / 8 / NG] for NG groups
    in the tile: the packed dequant's operands (load_dequant_packed's arguments). The tile's
    words, one 16-byte-aligned run a row (0 outside [N, K]); one scale (and zero) per row and
    group (0 past K), broadcast over the group's words (the tile lies in one group or spans
    whole groups: plan_gemm)."""
    BKW: tl.constexpr = BLOCK_K // 8
    NG: tl.constexpr = BLOCK_K // GROUP_SIZE if BLOCK_K > GROUP_SIZE else 1
    words_ptr = qbytes_ptr.to(tl.pointer_type(tl.int32), bitcast=True)
    offs_w = k0 // 8 + tl.arange(0, BKW)
    mask_n = offs_n < N
    mask = mask_n[:, None] if EVEN_K else mask_n[:, None] & (offs_w[None, :] < K // 8)
    rows = offs_n.to(tl.int64)[:, None] * (stride_qn // 4)  # N * K / 8 words can pass 2**31
    words = tl.load(words_ptr + rows + offs_w[None, :], mask=mask, other=0,
                    eviction_policy="evict_first")  # fmt: skip
    words = tl.reshape(words, (BLOCK_N, NG, BKW // NG))  # [rows, group, its words]
    offs_g = k0 // GROUP_SIZE + tl.arange(0, NG)
    mask_g = mask_n[:, None] if EVEN_K else mask_n[:, None] & (offs_g[None, :] < K // GROUP_SIZE)
    at = offs_n[:, None] * stride_sn + offs_g[None, :]
    scales = tl.load(scales_ptr + at, mask=mask_g, other=0.0)[:, :, None]
    zeros = scales  # unused without zero points
    if HAS_ZEROS:
        at_z = offs_n[:, None] * stride_zn + offs_g[None, :]
        zeros = tl.load(zeros_ptr + at_z, mask=mask_g, other=0)[:, :, None]
    s2, c2 = _packed_consts(words, scales, zeros, HAS_ZEROS, DTYPE)
    return words, s2, c2


@triton.jit
def packed_k_order_w(t0, t1, t2, t3, DTYPE: tl.constexpr, BLOCK_N: tl.constexpr,
                     BLOCK_K: tl.constexpr):  # fmt: skip
    """The packed dequant's registers (t_j of word i [BLOCK_N, BLOCK_K/8]: the DTYPE pair of
    its weights j, j + 4) as a DTYPE [BLOCK_N, BLOCK_K] tile in the packed K order: position
    32 w' + 8 j + 2 t + e holds k = 8 (WPT t + w') + j + 4 e of the tile (WPT = BLOCK_K / 32
    words, t = 0..3, w' < WPT, e = 0, 1: the pair's halves).

    Why that order: Hopper's wgmma takes A from registers as 16-bit pairs of adjacent K, lane
    t of each quad holding the pairs p = t (mod 4) of its rows (kWidth 2). Each t_j is such a
    pair as it is (no PRMT), and the pairs of lane t are exactly words WPT t .. WPT t + WPT - 1
    of the row, so the compiler gives each lane its own words (one 128-bit shared-memory
    load a row at BLOCK_K 128) and the joins, permute and reshape below move no data."""
    WPT: tl.constexpr = BLOCK_K // 32
    shape: tl.constexpr = (BLOCK_N, 4, WPT)  # word WPT t + w' at [:, t, w']
    r = tl.join(
        tl.join(tl.reshape(t0, shape), tl.reshape(t2, shape)),
        tl.join(tl.reshape(t1, shape), tl.reshape(t3, shape)),
    )  # [BN, t, w', b, a]: t_j, j = 2 b + a
    lo = r.to(tl.int16).to(DTYPE, bitcast=True)  # weight j (the low half)
    hi = (r >> 16).to(tl.int16).to(DTYPE, bitcast=True)  # weight j + 4
    w = tl.permute(tl.join(lo, hi), (0, 2, 3, 4, 1, 5))  # [BN, w', b, a, t, e]
    return tl.reshape(w, (BLOCK_N, BLOCK_K))


@triton.jit
def packed_k_order_x(x_tile, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    """x [BLOCK_M, BLOCK_K] in packed_k_order_w's K order (on the GPU: a 128-bit load per 8
    values from shared memory, a PRMT per pair and a 32-bit store into the wgmma B tile)."""
    WPT: tl.constexpr = BLOCK_K // 32
    x = tl.reshape(x_tile, (BLOCK_M, 4, WPT, 2, 2, 2))  # k = 8 (WPT t + w') + 4 e + 2 b + a
    x = tl.permute(x, (0, 2, 4, 5, 1, 3))  # [BM, w', b, a, t, e]
    return tl.reshape(x, (BLOCK_M, BLOCK_K))


def w4a16_gemm(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor | None,
    *,
    group_size: int,
    bias: torch.Tensor | None = None,
    split_k: int | None = None,
    plan: GemmPlan | None = None,
) -> torch.Tensor:
    """x [M, K] @ W.T for checked, contiguous packed inputs; group_size is the resolved G.

    `plan` defaults to `plan_gemm` for these shapes on x's device (the real M, at run time),
    with `split_k` forced when given (tests cover both paths)."""
    m, k = x.shape
    n = qweight.shape[0]
    if plan is None:
        plan = plan_gemm(m, n, k, group_size, num_sms(x.device), split_k)
    split_k = plan.split_k
    out, stride_os = splitk_output(x, m, n, split_k)
    launch(
        w4a16_gemm_kernel,
        plan.grid,
        dict(
            x_ptr=x,
            qbytes_ptr=qweight.view(torch.uint8),
            scales_ptr=scales,
            zeros_ptr=zeros,
            bias_ptr=bias,
            out_ptr=out,
            M=m,
            N=n,
            K=k,
            stride_xm=x.stride(0),
            stride_xk=x.stride(1),
            stride_qn=qweight.stride(0) * 4,
            stride_sn=scales.stride(0),
            stride_zn=0 if zeros is None else zeros.stride(0),
            stride_om=n,
            stride_on=1,
            stride_os=stride_os,
            GROUP_SIZE=group_size,
            HAS_ZEROS=zeros is not None,
            HAS_BIAS=bias is not None,
            SPLIT_K=split_k,
            EVEN_K=k % plan.block_k == 0,
            DOT_FP32=use_fp32_dot(x),
            INTERPRET=interpreting(),
            SWAP=plan.swap,
            BLOCK_M=plan.block_m,
            BLOCK_N=plan.block_n,
            BLOCK_K=plan.block_k,
            num_warps=plan.num_warps,
            num_stages=plan.num_stages,
        ),
    )
    if split_k == 1:
        return out
    return splitk_reduce(out, bias=bias, dtype=x.dtype)
