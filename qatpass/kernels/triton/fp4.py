"""Triton FP4 (NVFP4, MXFP4) linear: the INT4 kernels' launch structure, FP4 decode in registers.

    y = fp4_matmul(x2d, qweight, scales, global_scale, fmt="nvfp4")   # fp32 [M, N]

Inputs are the canonical FP4 format of `qatpass.scheme_fp4`: qweight int32 [N, K/8] (E2M1
codes, low nibble first), scales [N, K/B] (NVFP4 float8_e4m3fn, B = 16; MXFP4 uint8 E8M0,
B = 32), and for NVFP4 the fp32 global scale, read by the kernels from device memory (no host
sync: CUDA-graph safe). Kernels, launched as the INT4 ones (`common.launch`, plans from
`plan.py` on the real M, split-K partials summed by `splitk_reduce` in a fixed order):

- `fp4_gemv_kernel` (M <= plan.FP4_GEMV_MAX_M, decode): the INT4 GEMV's tile, split-K and prefetch
  (`plan.plan_fp4_gemv`: `plan_gemv`'s rules; `gemv._load_words` / `_load_side`: 128-bit
  evict-first word loads, the next step's words loaded before this step's math); tensor cores
  for bf16 x on GPU (`_fp4_mma_word`: gemv._mma_word's mma.sync layout and x pairs), CUDA
  cores otherwise (fp16 / fp32 x, the interpreter);
- `fp4_gemm_kernel` (M >= 2): the INT4 GEMM's tiling (`plan.plan_fp4_gemm`: `plan_gemm`'s
  rules), the weight tile decoded in registers into one tensor-core `tl.dot` per K step.

Decode (`e2m1_value`, `block_factor`: the only FP4 decode, used by both kernels). An E2M1
code s|e1 e0|m moved to fp32 bits 31 | 22..24 is exactly its value times 2**-126 (e = 0 lands
in fp32's subnormals: code 1, 0.5, becomes 2**-127), so one arithmetic shift, one AND and one
exact multiply by 2**126 give the value. The E4M3 byte (positive) is exactly the fp32
((b << 20) + (120 << 23)) when normal, m * 2**-9 when subnormal (NVFP4's element scale,
`Fp4Scheme.element_scales`, is that / global_scale: the kernels divide the sums instead, an
IEEE division, `div_rn`). E8M0 is 2**(b - 127) from the bits (b = 0: the subnormal 2**-127).

Numerics. The reference is x @ dequantize(p, float32).T: w = v * s in fp32 (v the E2M1
value, s the block's fp32 element scale: E4M3 / gs for NVFP4, 2**e for MXFP4), products w * x
and their sum in fp32.

- GEMV (CUDA cores): the block's stored factor f_b (E4M3 value, or 2**e) is applied once per
  block to the block's partial sum, NVFP4's 1 / gs once to the row's sum: y = (sum_b f_b *
  (sum_{k in b} v_k x_k)) / gs. For 16-bit x each v_k x_k is exact in fp32 (2 + 11 significant
  bits; for fp32 x it is rounded once, as the reference's w_k x_k is); the partial sums are
  fp32 sums, and the factor and the division round once each where the reference rounds
  s_b = f_b / gs and each w_k = v_k s_b once. Both are fp32 evaluations of the same exact sum
  with one rounding per operation, differing only in where the roundings fall: an error of
  the size of a different fp32 summation order (<= (n + 2) u sum |w x|, u = 2**-24).
- GEMV, tensor cores (bf16 x): per word the PTX decode puts codes (j, j + 4) at bf16 bits
  6..9 / 22..25 (sign at 15 / 31): the bf16 pair of value * 2**-126 exactly (code 1 a bf16
  subnormal, 2**-127); times 2**126 (exact) it is the values, times the block factor f (bf16,
  exact: the E4M3 value or 2**e) the weights v * f, exact in bf16 as below; two mma.sync
  m16n8k16 multiply them by x exactly and accumulate in fp32 (with the tensor cores'
  truncating alignment, an error of the size of a different fp32 summation order, as the INT4
  GEMV says); NVFP4's 1 / gs once per output. `mul.rn.bf16x2` keeps subnormals (no .ftz).
- GEMM (tensor cores, FUSED): the weight fed to the dot is v * f, f the block's stored factor
  (the E4M3 value; the E8M0 power of two), in x's dtype, and it is exact there: v * E4M3 has at
  most 2 + 4 significant bits and lies in [2**-10, 2688] (exact in bf16 and fp16); v * 2**e is
  the reference's w itself, exact in bf16 (fp32's exponent range, its subnormals included) but
  not always in fp16, so MXFP4 with fp16 x is not fused. The mma multiplies exact 16-bit
  operands exactly and accumulates in fp32; NVFP4's 1 / gs is applied to the sums (one IEEE
  division per output) where the reference folds it into each element scale: the same
  rounding-placement difference as above. Unfused (MXFP4, fp16 x): one block per K step, the
  dot of the values (exact in fp16) then times 2**e (exact unless the sum under- or overflows).
  DOT_FP32 (fp32 x, and the interpreter, whose bf16 `tl.dot` is wrong) runs the same dots in
  fp32 (`input_precision="ieee"`, never TF32). Tensor cores are assumed to keep bf16
  subnormal inputs (only MXFP4 blocks with amax below 2**-124 produce them).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from qatpass.kernels.triton.common import (
    check_device,
    interpreting,
    launch,
    num_sms,
    use_fp32_dot,
)
from qatpass.kernels.triton.gemv import (
    _load_side,
    _load_words,
    _packed_consts,
    _planes,
    _x_pairs,
)
from qatpass.kernels.triton.plan import (
    FP4_GEMV_MAX_M,
    FP4_GEMV_OCCUPANCY,
    FP4_GEMV_PLAN_GROUP,
    GEMV_MMA_BLOCK_K,
    GemmPlan,
    GemvPlan,
    plan_fp4_gemm,
    plan_fp4_gemv,
)
from qatpass.kernels.triton.splitk_reduce import splitk_output, splitk_reduce
from qatpass.scheme_fp4 import FP4_FORMATS

__all__ = ["fp4_gemm", "fp4_gemv", "fp4_matmul", "FP4_FORMAT_IDS"]

FP4_FORMAT_IDS = {"nvfp4": 0, "mxfp4": 1}  # the kernels' FMT constexpr
# fp32 bits 31 (sign) and 22..24 (E2M1 exponent, mantissa), as a signed int32
E2M1_BITS = tl.constexpr(-2118123520)  # 0x81C00000
TWO_POW_126 = tl.constexpr(8.507059173023462e37)
E4M3_REBIAS = tl.constexpr(120 << 23)  # fp32 exponent bias 127 - E4M3's 7, in place
E8M0_ZERO_BITS = tl.constexpr(0x00400000)  # fp32 2**-127 (subnormal)
# GEMM: the BLOCK_Ks the plan may use (the largest dividing K, >= 32 where K allows: 16 bytes
# a column, 128-bit weight loads; plan_gemm may narrow it; 128 spilled at M = 16 on sm_90)
FP4_GEMM_BLOCK_KS = (64, 32, 16)
# GEMV: the unroll (renames the prefetch registers, as the INT4 GEMV)
FP4_GEMV_UNROLL = 2
REGS_PER_SM = 65536


@triton.jit
def e2m1_value(t):
    """fp32 value of the E2M1 code in bits 28..31 of int32 t (lower bits ignored): the shift
    puts the magnitude index at bits 22..24 and copies the sign over 25..31; masked, that is
    the value times 2**-126 exactly, and times 2**126 (exact) the value."""
    return ((t >> 6) & E2M1_BITS).to(tl.float32, bitcast=True) * TWO_POW_126


@triton.jit
def block_factor(byte, FMT: tl.constexpr):
    """fp32 value of a stored block-scale byte: NVFP4 (FMT 0) E4M3 (positive), MXFP4 (FMT 1)
    E8M0 2**(byte - 127)."""
    b = byte.to(tl.int32) & 0xFF
    if FMT == 0:
        m = b & 0x7F  # scales are positive
        normal = ((m << 20) + E4M3_REBIAS).to(tl.float32, bitcast=True)
        return tl.where(m >= 8, normal, (m & 7).to(tl.float32) * 0.001953125)
    return tl.where(b == 0, E8M0_ZERO_BITS, b << 23).to(tl.float32, bitcast=True)


@triton.jit
def _global_scale(gs_ptr, FMT: tl.constexpr):
    """NVFP4's fp32 global scale, read on the device; 1 for MXFP4."""
    if FMT == 0:
        return tl.load(gs_ptr).to(tl.float32)
    return 1.0


@triton.jit
def _fp4_word_dot(words, xs):
    """sum_j value(nibble j) * x_j over the 8 codes of each int32 word (fp32)."""
    x0, x1, x2, x3, x4, x5, x6, x7 = xs
    acc = e2m1_value(words << 28) * x0
    acc += e2m1_value(words << 24) * x1
    acc += e2m1_value(words << 20) * x2
    acc += e2m1_value(words << 16) * x3
    acc += e2m1_value(words << 12) * x4
    acc += e2m1_value(words << 8) * x5
    acc += e2m1_value(words << 4) * x6
    acc += e2m1_value(words) * x7
    return acc


# The tensor-core GEMV's decode: nibble pair (j, j + 4) of a word shifted to bits 6..9 / 22..25
# (bf16: the magnitude index on the exponent's low 2 bits and the mantissa's top bit), the
# sign bits moved to 15 / 31: the bf16 pair of value * 2**-126 (index 1 a subnormal), exact.
E2M1_BF16_SHIFTS = ((6, "shl"), (2, "shl"), (2, "shr"), (6, "shr"))
BF16_TWO_POW_126 = "0x7E807E80"  # bf16 2**126 in both halves
MMA_BLOCK_K = tl.constexpr(GEMV_MMA_BLOCK_K)  # the tile gemv._mma_word's layout needs


@triton.constexpr_function
def _fp4_mma_asm() -> str:
    """PTX: word $1 -> t0..t3, the bf16 pairs (value(nibble j) * f, value(nibble j + 4) * f),
    f the bf16 pair $2 (the block factor); then two mma.sync m16n8k16 (bf16, fp32
    accumulation) with the x pairs $3..$6 onto $7 (the layout of gemv._mma_word)."""
    decode = "mov.b32 c, " + BF16_TWO_POW_126 + ";"
    for j, (n, op) in enumerate(E2M1_BF16_SHIFTS):
        shift = f"shl.b32 u, $1, {n};" if op == "shl" else f"shr.u32 u, $1, {n};"
        decode += (
            shift
            + f"and.b32 t{j}, u, 0x01C001C0; shl.b32 u, u, 6;"
            + f"lop3.b32 t{j}, u, 0x80008000, t{j}, 0xea;"
            + f"mul.rn.bf16x2 t{j}, t{j}, c; mul.rn.bf16x2 t{j}, t{j}, $2;"
        )
    mma = "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32"
    return (
        "{ .reg .b32 t0, t1, t2, t3, u, z, c; .reg .f32 p, q1, q2, q3, zf;"
        "mov.b32 z, 0; mov.f32 zf, 0f00000000;"
        + decode
        + f"{mma} {{p, q1, q2, q3}}, {{t0, z, t1, z}}, {{$3, $4}}, {{$7, $7, zf, zf}};"
        + f"{mma} {{$0, q1, q2, q3}}, {{t2, z, t3, z}}, {{$5, $6}}, {{p, q1, q2, q3}};"
        + "}"
    )


@triton.jit
def _fp4_mma_word(words, f2, xp0, xp1, xp2, xp3, acc):
    """acc + (the quad's dot of its words with x) on the tensor cores: per word, the bf16
    weights value * f (exact: see the module docstring) and two mma.sync (gemv._mma_word's
    operand layout; the caller divides the sum by the quad's 4 lanes)."""
    return tl.inline_asm_elementwise(
        _fp4_mma_asm(), "=f,r,r,r,r,r,r,f", [words, f2, xp0, xp1, xp2, xp3, acc],
        dtype=tl.float32, is_pure=True, pack=1,
    )  # fmt: skip


@triton.jit
def fp4_gemv_kernel(
    # tensors
    x_ptr,  # fp16/bf16/fp32 [M, K], unit stride along K
    qweight_ptr,  # int32 [N, K/8]: E2M1 code j of word w is k = 8 w + j (low nibble first)
    scales_ptr,  # uint8 [N, K/BLOCK]: E4M3 (NVFP4) or E8M0 (MXFP4) bytes
    gs_ptr,  # fp32 [] NVFP4 global scale, or None
    out_ptr,  # fp32 [M, N] when SPLIT_K == 1, else fp32 partials [SPLIT_K, M, N]
    # sizes
    N,
    K,
    K_STEPS,  # cdiv(K, BLOCK_K)
    STEPS,  # K steps per split
    # strides (elements)
    stride_xm,
    stride_qn,  # words
    stride_sn,
    stride_om,
    stride_os,
    # meta
    FMT: tl.constexpr,  # FP4_FORMAT_IDS
    BLOCK: tl.constexpr,  # the format's block size (the scale group)
    SPLIT_K: tl.constexpr,
    EVEN_K: tl.constexpr,  # K % BLOCK_K == 0: no mask along K
    EVEN_N: tl.constexpr,  # N % BLOCK_N == 0: no mask along N
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    UNROLL: tl.constexpr,  # loop unroll factor (renames the prefetch registers)
    INTERPRET: tl.constexpr,  # the Triton interpreter: no inline PTX (CUDA cores)
):
    """out[m, n] = sum_k x[m, k] * w[n, k]; grid (M, N/BLOCK_N, SPLIT_K)."""
    BKW: tl.constexpr = BLOCK_K // 8
    NG: tl.constexpr = BLOCK_K // BLOCK if BLOCK_K > BLOCK else 1  # blocks per tile
    WG: tl.constexpr = BKW // NG  # words per block within the tile
    row = tl.program_id(0).to(tl.int64)
    pid_n = tl.program_id(1)
    pid_k = tl.program_id(2)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_w = tl.arange(0, BKW)
    offs_g = tl.arange(0, NG)
    mask_n = offs_n < N
    kb = pid_k * STEPS
    kb_end = tl.minimum(kb + STEPS, K_STEPS)
    gs = _global_scale(gs_ptr, FMT)

    w_rows = qweight_ptr + offs_n.to(tl.int64)[:, None] * stride_qn
    s_rows = scales_ptr + offs_n.to(tl.int64)[:, None] * stride_sn
    x_row = x_ptr + row * stride_xm
    offs_x = offs_w[:, None] * 8 + tl.arange(0, 8)[None, :]

    # tensor cores (_fp4_mma_word): bf16 x, 16 words a row (4 lanes along K, gemv._mma_word)
    MMA: tl.constexpr = (
        x_ptr.dtype.element_ty == tl.bfloat16 and not INTERPRET and BLOCK_K == MMA_BLOCK_K
    )
    if MMA:
        acc = tl.zeros((BLOCK_N, NG, WG), dtype=tl.float32)
    else:
        acc = tl.zeros((BLOCK_N, NG), dtype=tl.float32)
    last = kb_end - 1
    wn = _load_words(w_rows, offs_w, tl.minimum(kb, last), kb <= last, mask_n, K, EVEN_K,
                     EVEN_N, BLOCK_K)  # fmt: skip
    for step in tl.range(kb, kb_end, loop_unroll_factor=UNROLL):
        words = wn
        nxt = tl.minimum(step + 1, last)
        wn = _load_words(w_rows, offs_w, nxt, step < last, mask_n, K, EVEN_K, EVEN_N, BLOCK_K)
        sbytes, _, x = _load_side(s_rows, s_rows, x_row, offs_g, offs_x, step, mask_n, K,
                                  BLOCK, False, EVEN_K, EVEN_N, BLOCK_K, NG)  # fmt: skip
        words = tl.reshape(words, (BLOCK_N, NG, WG))
        factor = block_factor(sbytes, FMT)
        if MMA:
            xp0, xp1, xp2, xp3 = _x_pairs(x_row, step, K, NG, WG, BLOCK_K, EVEN_K)
            f2, _ = _packed_consts(words, factor[:, :, None], factor, False, tl.bfloat16)
            acc = _fp4_mma_word(words, f2, xp0, xp1, xp2, xp3, acc)
        else:
            part = _fp4_word_dot(words, _planes(x.to(tl.float32), BKW, NG, WG))
            # the block's partial sum, then its stored factor (see the module docstring)
            acc += tl.sum(part, axis=2) * factor

    if MMA:
        out_row = tl.sum(tl.sum(acc, axis=2), axis=1) * 0.25  # each quad lane holds the sum
    else:
        out_row = tl.sum(acc, axis=1)
    if FMT == 0:  # NVFP4's element scale is E4M3 / global scale: the division, once per sum
        out_row = tl.div_rn(out_row, tl.zeros_like(out_row) + gs)
    if SPLIT_K == 1:
        tl.store(out_ptr + row * stride_om + offs_n, out_row, mask=mask_n)
    else:
        tl.store(out_ptr + pid_k * stride_os + row * stride_om + offs_n, out_row, mask=mask_n)


@triton.jit
def _decode_bytes(packed, BLOCK_N: tl.constexpr, ROWS: tl.constexpr):
    """int32 bytes [ROWS, BLOCK_N] (two codes each, low nibble = even k) -> fp32 E2M1 values
    [2 ROWS, BLOCK_N] in k order (join / permute / reshape interleave the nibbles)."""
    values = tl.join(e2m1_value(packed << 28), e2m1_value(packed << 24))  # [ROWS, BN, 2]
    return tl.reshape(tl.permute(values, (0, 2, 1)), (2 * ROWS, BLOCK_N))


@triton.jit
def fp4_gemm_kernel(
    # tensors
    x_ptr,  # fp16/bf16/fp32 [M, K]
    qbytes_ptr,  # uint8 [N, K/2]: qweight's bytes, code k % 2 of byte k // 2 (low = even k)
    scales_ptr,  # uint8 [N, K/BLOCK]: E4M3 (NVFP4) or E8M0 (MXFP4) bytes
    gs_ptr,  # fp32 [] NVFP4 global scale, or None
    out_ptr,  # fp32 [M, N] when SPLIT_K == 1, else fp32 partials [SPLIT_K, M, N]
    # sizes
    M,
    N,
    K,
    # strides (elements)
    stride_xm,
    stride_qn,  # bytes
    stride_sn,
    stride_om,
    stride_os,
    # meta
    FMT: tl.constexpr,  # FP4_FORMAT_IDS
    BLOCK: tl.constexpr,  # the format's block size; BLOCK_K is a multiple of it
    FUSED: tl.constexpr,  # weights exact in the dot's dtype (see the module docstring)
    SPLIT_K: tl.constexpr,
    DOT_FP32: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """out = x @ w.T tile by tile; grid (M/BLOCK_M, N/BLOCK_N, SPLIT_K), M fastest. K is a
    multiple of BLOCK_K. FUSED: w = value * block factor (E4M3 value, E8M0 power of two) in the
    dot's dtype, one dot per step, NVFP4's 1 / global scale applied to the sums; otherwise
    (BLOCK_K == BLOCK) each step's dot of the values, then times the block scale."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_k = tl.program_id(2)
    offs_m = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_n = offs_n < N

    k_blocks = tl.cdiv(K, BLOCK_K)
    per_split = tl.cdiv(k_blocks, SPLIT_K)
    kb_start = pid_k * per_split
    kb_end = tl.minimum(kb_start + per_split, k_blocks)
    NB: tl.constexpr = BLOCK_K // BLOCK  # blocks per step
    rows = qbytes_ptr + offs_n.to(tl.int64)[None, :] * stride_qn
    s_rows = scales_ptr + offs_n[None, :] * stride_sn
    x_rows = x_ptr + offs_m[:, None] * stride_xm

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for kb in range(kb_start, kb_end):
        k0 = kb * BLOCK_K
        offs_b = k0 // 2 + tl.arange(0, BLOCK_K // 2)
        packed = tl.load(rows + offs_b[:, None], mask=mask_n[None, :], other=0,
                         eviction_policy="evict_first").to(tl.int32)  # fmt: skip
        values = _decode_bytes(packed, BLOCK_N, BLOCK_K // 2)
        groups = k0 // BLOCK + tl.arange(0, NB)
        factor = block_factor(tl.load(s_rows + groups[:, None], mask=mask_n[None, :], other=0),
                              FMT)  # fmt: skip
        x_tile = tl.load(x_rows + (k0 + tl.arange(0, BLOCK_K))[None, :], mask=mask_m[:, None],
                         other=0.0)  # fmt: skip
        if FUSED:
            w = tl.reshape(tl.reshape(values, (NB, BLOCK, BLOCK_N)) * factor[:, None, :],
                           (BLOCK_K, BLOCK_N))  # fmt: skip
            if DOT_FP32:
                acc = tl.dot(x_tile.to(tl.float32), w, acc, input_precision="ieee")
            else:
                acc = tl.dot(x_tile, w.to(x_tile.dtype), acc)  # exact in x's dtype
        else:  # one block per step (MXFP4, fp16 x): the values' dot, then the scale
            if DOT_FP32:
                part = tl.dot(x_tile.to(tl.float32), values, input_precision="ieee")
            else:
                part = tl.dot(x_tile, values.to(x_tile.dtype))  # E2M1 values are exact
            acc += part * tl.reshape(factor, (BLOCK_N,))[None, :]
    if FMT == 0:  # NVFP4's element scale is E4M3 / global scale: the division, once per sum
        acc = tl.div_rn(acc, tl.zeros_like(acc) + _global_scale(gs_ptr, FMT))

    mask = mask_m[:, None] & mask_n[None, :]
    out = out_ptr + pid_k * stride_os + offs_m[:, None] * stride_om + offs_n[None, :]
    tl.store(out, acc, mask=mask)


def _operands(x, qweight, scales, global_scale, fmt: str):
    if fmt not in FP4_FORMAT_IDS:
        raise ValueError(f"fmt must be one of {sorted(FP4_FORMAT_IDS)}, got {fmt!r}")
    check_device(x, {"qweight": qweight, "scales": scales, "global_scale": global_scale})
    if x.stride(-1) != 1:
        x = x.contiguous()
    gs = None
    if fmt == "nvfp4":
        if global_scale is None:
            raise ValueError("global_scale: nvfp4 needs its fp32 global scale")
        gs = global_scale.reshape(()).to(torch.float32)
    return x, qweight.contiguous(), scales.contiguous().view(torch.uint8), gs


def fp4_gemv(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    global_scale: torch.Tensor | None,
    *,
    fmt: str,
    split_k: int | None = None,
    plan: GemvPlan | None = None,
) -> torch.Tensor:
    """fp32 x [M, K] @ W.T by the FP4 GEMV; `plan` defaults to `plan.plan_fp4_gemv`, with
    `split_k` forced when given (tests cover both paths)."""
    x, qweight, scales, gs = _operands(x, qweight, scales, global_scale, fmt)
    m, k = x.shape
    n = qweight.shape[0]
    block = FP4_FORMATS[fmt]
    # the tensor-core path: bf16 x on the GPU with the GEMV_MMA_BLOCK_K tile, which the plan
    # gives where K has a step of it and is a multiple of its group (the kernel's MMA constexpr
    # decides; this picks the plan and register cap that go with it)
    bf16 = x.dtype == torch.bfloat16 and not interpreting()
    if plan is None:
        mma = bf16 and k >= GEMV_MMA_BLOCK_K and k % FP4_GEMV_PLAN_GROUP == 0
        plan = plan_fp4_gemv(m, n, k, block, num_sms(x.device), split_k, mma)
    mma = bf16 and plan.block_k == GEMV_MMA_BLOCK_K
    # registers capped so that the path's FP4_GEMV_OCCUPANCY CTAs fit on an SM (multiple of 8)
    threads = 32 * plan.num_warps
    maxnreg = REGS_PER_SM // (FP4_GEMV_OCCUPANCY[mma] * threads) // 8 * 8
    if x.element_size() == 2 and (x.storage_offset() % 2 or x.stride(0) % 2):
        # the tensor-core path reads x as 32-bit pairs (gemv._x_pairs): 4-byte aligned rows
        x = torch.empty_like(x, memory_format=torch.contiguous_format).copy_(x)
    out, stride_os = splitk_output(x, m, n, plan.split_k, torch.float32)
    launch(fp4_gemv_kernel, plan.grid, dict(
        x_ptr=x, qweight_ptr=qweight, scales_ptr=scales, gs_ptr=gs, out_ptr=out,
        N=n, K=k, K_STEPS=plan.k_steps, STEPS=plan.steps,
        stride_xm=x.stride(0), stride_qn=qweight.stride(0), stride_sn=scales.stride(0),
        stride_om=n, stride_os=stride_os,
        FMT=FP4_FORMAT_IDS[fmt], BLOCK=block, SPLIT_K=plan.split_k,
        EVEN_K=k % plan.block_k == 0, EVEN_N=n % plan.block_n == 0,
        BLOCK_N=plan.block_n, BLOCK_K=plan.block_k, UNROLL=FP4_GEMV_UNROLL,
        INTERPRET=interpreting(),
        num_warps=plan.num_warps, num_stages=1, maxnreg=maxnreg,
    ))  # fmt: skip
    if plan.split_k == 1:
        return out
    return splitk_reduce(out, bias=None, dtype=torch.float32)


def fp4_gemm(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    global_scale: torch.Tensor | None,
    *,
    fmt: str,
    split_k: int | None = None,
    plan: GemmPlan | None = None,
) -> torch.Tensor:
    """fp32 x [M, K] @ W.T by the FP4 GEMM; `plan` defaults to `plan.plan_fp4_gemm`, `split_k`
    forced when given."""
    x, qweight, scales, gs = _operands(x, qweight, scales, global_scale, fmt)
    m, k = x.shape
    n = qweight.shape[0]
    block = FP4_FORMATS[fmt]
    # MXFP4's weights 2**e * value are exact in bf16 (and fp32) but not always in fp16
    fused = fmt == "nvfp4" or x.dtype != torch.float16
    if plan is None:
        step = next(g for g in FP4_GEMM_BLOCK_KS if k % g == 0) if fused else block
        plan = plan_fp4_gemm(m, n, k, step, num_sms(x.device), split_k, narrow=not fused)
    if plan.block_k % block or k % plan.block_k or not (fused or plan.block_k == block):
        raise ValueError(
            f"plan: BLOCK_K {plan.block_k} must be a multiple of the {fmt} block (the block "
            f"itself for fp16 x with mxfp4) and divide K={k}"
        )
    out, stride_os = splitk_output(x, m, n, plan.split_k, torch.float32)
    launch(fp4_gemm_kernel, plan.grid, dict(
        x_ptr=x, qbytes_ptr=qweight.view(torch.uint8), scales_ptr=scales, gs_ptr=gs,
        out_ptr=out, M=m, N=n, K=k,
        stride_xm=x.stride(0), stride_qn=qweight.stride(0) * 4, stride_sn=scales.stride(0),
        stride_om=n, stride_os=stride_os,
        FMT=FP4_FORMAT_IDS[fmt], BLOCK=block, FUSED=fused, SPLIT_K=plan.split_k,
        DOT_FP32=use_fp32_dot(x), BLOCK_M=plan.block_m, BLOCK_N=plan.block_n,
        BLOCK_K=plan.block_k, num_warps=plan.num_warps, num_stages=plan.num_stages,
    ))  # fmt: skip
    if plan.split_k == 1:
        return out
    return splitk_reduce(out, bias=None, dtype=torch.float32)


def fp4_matmul(
    x2d: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    global_scale: torch.Tensor | None,
    fmt: str,
) -> torch.Tensor:
    """fp32 x2d [M, K] @ W.T for an FP4 weight (validated by the caller: `ops._fp4_packed`):
    the GEMV up to plan.FP4_GEMV_MAX_M rows, the GEMM above."""
    m, _ = x2d.shape
    n = qweight.shape[0]
    if m == 0 or n == 0:
        return torch.zeros((m, n), device=x2d.device, dtype=torch.float32)
    if m <= FP4_GEMV_MAX_M:
        return fp4_gemv(x2d, qweight, scales, global_scale, fmt=fmt)
    return fp4_gemm(x2d, qweight, scales, global_scale, fmt=fmt)
