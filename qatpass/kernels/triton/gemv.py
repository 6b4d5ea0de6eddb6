"""W4A16 GEMV for decode: one row of x per program row (or 8 / 16 on the tensor cores), split
along K.

Each program owns BLOCK_N weight rows and a run of STEPS K steps of BLOCK_K. Per step it loads
the weight tile as int32 words [BLOCK_N, BLOCK_K/8] (four words, 128 bits, per thread,
evict-first: weights are read once), the scales (and zeros) of the groups in the tile, and x;
the next step's tiles are loaded before this step's math (prefetch in registers).

Three inner paths, chosen by constexprs:

- Tensor cores (16-bit x with scales exact in x's dtype, BLOCK_K = 128, on GPU: `_mma_word`).
  Per word of 8 weights: the packed dequant (`_dequant_asm`: 4 LOP3 + 3 shifts put nibble
  pairs (j, j + 4) under the 16-bit magic 128 / 1024, 4 packed subtractions of 136 + zero give
  the exact codes, 4 packed multiplies by the scale the weights, each rounded once) and two
  mma.sync m16n8k16 with fp32 accumulation whose B operand is x's matching pairs: no unpack to
  fp32 and no per-weight FMA (3.2-3.6 instructions per weight in the main loop, static).
  Several rows of x (M = 2..16, batched decode: `_mma_rows`, BLOCK_M = 8 or 16 rows a
  program): the swapped-operand small-M form. The weight stays the A operand, the B
  operand's 8 columns carry 8 rows of x (16: two n8 blocks, two more mma per word), so each
  word is dequantised once for every row; x rows are read by 128-bit loads in inline PTX
  (`_x_pairs_rows`), rows beyond M read row M - 1 and their columns are never stored; each
  row's outputs are picked out of the lanes' accumulators (`_rows_out`) and stored, or
  written as split-K partials [SPLIT_K, M, N]. 3.1 instructions per weight at M <= 8, 3.6
  at M = 16 (static; zero points at M > 8: two programs of 8 rows, w4a16_gemv).
- CUDA cores, 16-bit x (fp32 scales; and the interpreter): `_dequant_rounded` gives the same
  rounded weights in fp32, one FMA each.
- CUDA cores, fp32 x: exact codes by the fp32 magic (`_word_dot`), the scale once per group.

Numerics. `qatpass.dequantize(p, dtype=x.dtype)` computes w = (code - zero) * scale in fp32
and rounds it to x.dtype (bf16/fp16). The code is a small integer (|code - zero| <= 15, 5
bits) and the scale a 16-bit float (8 / 11 significant bits), so the product is exact in fp32
and its single rounding to x.dtype is exactly what the packed 16-bit multiply (mul.rn.bf16x2 /
f16x2) returns: a bf16 product of a small integer code and a bf16 scale rounds exactly like
fp32-then-cast (no double rounding). The subtraction (128 + nib) - (136 + zero) is exact (small
integers). That needs the scale exactly in x's dtype: bf16 scales for bf16 x; bf16 or fp16
scales for fp16 x (a bf16 scale converts to fp16 exactly for |scale| >= 2**-17; below that, an
fp16 subnormal, a weight can differ by one fp16 subnormal step, 2**-24); fp32 scales take the
fp32-then-cast path. Each product w * x of two 16-bit floats is exact in fp32 (at most 22
significant bits), on the tensor cores as on the CUDA cores, so the result is the reference's
sum of exact products; only the fp32 summation differs: its order, and on the tensor cores the
accumulator's internal alignment (products and partial sums added with truncation rather than
round-to-nearest), an error of the same size as a different fp32 summation order. For fp32
activations the kernel skips the reference's rounding of w to x.dtype, which is the identity
there. Zero points must lie in the scheme's code range [-8, 7] (136 + zero is a 16-bit integer).
Several rows of x change none of this: every row's output is its own sum of the same exact
products (the same rounded weights times that row's x, exact in fp32) with fp32
accumulation; the mma's columns are independent (a B column, an x row, only reaches its own
D column), so the rows of a program, and the row M - 1 copies beyond M, do not mix.

Split-K writes fp32 partials that `splitk_reduce` sums in a fixed order (deterministic); the
launch plan (`plan.plan_gemv`) sizes the tile, the split and the grid from the real shapes
(the grid's row blocks cdiv(M, BLOCK_M) from the real M). The CUDA-core paths (and the
interpreter) run one program per row of x.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from qatpass.kernels.triton.common import cast_rne, interpreting, launch, num_sms
from qatpass.kernels.triton.plan import GemvPlan, plan_gemv
from qatpass.kernels.triton.splitk_reduce import splitk_output, splitk_reduce

MAGIC = tl.constexpr(0x4B000000)  # fp32 2**23: its mantissa LSB has weight 1
# AND masks keeping MAGIC's bits and nibble j' (bits 4j'..4j'+3) of a word OR-ed with MAGIC
KEEP0 = tl.constexpr(0x4B00000F)
KEEP1 = tl.constexpr(0x4B0000F0)
KEEP2 = tl.constexpr(0x4B000F00)
KEEP3 = tl.constexpr(0x4B00F000)


@triton.jit
def _planes(t, BKW: tl.constexpr, NG: tl.constexpr, WG: tl.constexpr):
    """t [BKW, 8] -> its eight columns, in order, each shaped [1, NG, WG] (in-thread splits)."""
    even, odd = tl.split(tl.reshape(t, (BKW, 4, 2)))  # j = 0 2 4 6 | 1 3 5 7
    e04, e26 = tl.split(tl.reshape(even, (BKW, 2, 2)))
    o15, o37 = tl.split(tl.reshape(odd, (BKW, 2, 2)))
    x0, x4 = tl.split(e04)
    x2, x6 = tl.split(e26)
    x1, x5 = tl.split(o15)
    x3, x7 = tl.split(o37)
    shape: tl.constexpr = (1, NG, WG)
    return (
        tl.reshape(x0, shape), tl.reshape(x1, shape), tl.reshape(x2, shape),
        tl.reshape(x3, shape), tl.reshape(x4, shape), tl.reshape(x5, shape),
        tl.reshape(x6, shape), tl.reshape(x7, shape),
    )  # fmt: skip


@triton.jit
def _halves(words, INTERPRET: tl.constexpr):
    """(words's low 16 bits, its high 16 bits) each under MAGIC's high half: one PRMT each."""
    if INTERPRET:
        return (words & 0xFFFF) | MAGIC, ((words >> 16) & 0xFFFF) | MAGIC
    magic = tl.full(words.shape, MAGIC, tl.int32)
    lo = tl.inline_asm_elementwise(
        "prmt.b32 $0, $1, $2, 0x3254;", "=r,r,r", [magic, words], dtype=tl.int32,
        is_pure=True, pack=1,
    )  # fmt: skip
    hi = tl.inline_asm_elementwise(
        "prmt.b32 $0, $1, $2, 0x3276;", "=r,r,r", [magic, words], dtype=tl.int32,
        is_pure=True, pack=1,
    )  # fmt: skip
    return lo, hi


@triton.jit
def _word_dot(words, xs, off0, off1, off2, off3, INTERPRET: tl.constexpr):
    """sum_j code_j * x_j over the 8 nibbles of each word (fp32, products exact).

    lo / hi (the word, and the word shifted down 16) OR-ed with MAGIC carry planes 0..3 / 4..7
    in bits 0..15, which MAGIC leaves alone; AND-ing with MAGIC | (0xF << 4j') keeps exactly
    MAGIC and nibble j'. Every LOP3 has a single immediate (no constant to materialise)."""
    x0, x1, x2, x3, x4, x5, x6, x7 = xs
    lo, hi = _halves(words, INTERPRET)
    acc = (lo & KEEP0).to(tl.float32, bitcast=True) - off0
    acc = acc * x0
    acc += ((lo & KEEP1).to(tl.float32, bitcast=True) * 0.0625 - off1) * x1
    acc += ((lo & KEEP2).to(tl.float32, bitcast=True) * 0.00390625 - off2) * x2
    acc += ((lo & KEEP3).to(tl.float32, bitcast=True) * 0.000244140625 - off3) * x3
    acc += ((hi & KEEP0).to(tl.float32, bitcast=True) - off0) * x4
    acc += ((hi & KEEP1).to(tl.float32, bitcast=True) * 0.0625 - off1) * x5
    acc += ((hi & KEEP2).to(tl.float32, bitcast=True) * 0.00390625 - off2) * x6
    acc += ((hi & KEEP3).to(tl.float32, bitcast=True) * 0.000244140625 - off3) * x7
    return acc


@triton.jit
def _dequant_rounded(words, scales, zeros, HAS_ZEROS: tl.constexpr, DTYPE: tl.constexpr,
                     PACKED: tl.constexpr, INTERPRET: tl.constexpr):  # fmt: skip
    """The 8 weights of each word as fp32 values of round_DTYPE((code - zero) * scale), k order.

    GPU: nibble pairs (j, j + 4) sit at bits 4j and 16 + 4j; shifted down and OR-ed into the
    16-bit magic (bf16 128 / fp16 1024: unit mantissa LSB) they are two exact 16-bit floats
    128 + nib (1024 + nib), one packed subtraction of 136 + zero (1032 + zero) gives the exact
    codes, one packed multiply by the scale the weights, rounded once, as the reference's
    fp32-then-cast (the product of a 5-bit integer and a 16-bit float is exact in fp32). That
    needs the scale exactly in DTYPE (PACKED): bf16 scales for bf16 x; bf16 or fp16 scales for
    fp16 x (a bf16 scale converts to fp16 exactly for |scale| >= 2**-17; below that, an fp16
    subnormal, a weight can differ by one fp16 subnormal step, 2**-24). fp32 scales, and the
    interpreter, take fp32 math and a round-to-nearest-even cast (same values, more work).
    Zero points must lie in the scheme's code range [-8, 7] (so 136 + zero is a bf16 integer)."""
    if INTERPRET or not PACKED:
        zf = zeros.to(tl.float32) if HAS_ZEROS else 0.0
        s = scales.to(tl.float32)
        out = ()
        for j in tl.static_range(8):
            code = ((words >> (4 * j)) & 0xF).to(tl.float32) - 8.0 - zf
            out = out + (cast_rne(code * s, DTYPE, INTERPRET).to(tl.float32),)
        return out
    s2, c2 = _packed_consts(words, scales, zeros, HAS_ZEROS, DTYPE)
    if DTYPE == tl.bfloat16:
        unpack: tl.constexpr = (
            "shl.b32 $0, t0, 16; and.b32 $4, t0, 0xffff0000;"
            "shl.b32 $1, t1, 16; and.b32 $5, t1, 0xffff0000;"
            "shl.b32 $2, t2, 16; and.b32 $6, t2, 0xffff0000;"
            "shl.b32 $3, t3, 16; and.b32 $7, t3, 0xffff0000;"
        )
    else:
        unpack: tl.constexpr = (
            "mov.b32 {h0, h1}, t0; cvt.f32.f16 $0, h0; cvt.f32.f16 $4, h1;"
            "mov.b32 {h0, h1}, t1; cvt.f32.f16 $1, h0; cvt.f32.f16 $5, h1;"
            "mov.b32 {h0, h1}, t2; cvt.f32.f16 $2, h0; cvt.f32.f16 $6, h1;"
            "mov.b32 {h0, h1}, t3; cvt.f32.f16 $3, h0; cvt.f32.f16 $7, h1;"
        )
    asm: tl.constexpr = (
        "{ .reg .b32 t0, t1, t2, t3, u; .reg .b16 h0, h1;"
        + _dequant_asm(DTYPE, 8, 9, 10)
        + f"{unpack} }}"
    )
    return tl.inline_asm_elementwise(
        asm, "=f,=f,=f,=f,=f,=f,=f,=f,r,r,r", [words, s2, c2], dtype=(tl.float32,) * 8,
        is_pure=True, pack=1,
    )  # fmt: skip


@triton.constexpr_function
def _dequant_asm(dtype, word: int, scale: int, offset: int) -> str:
    """PTX turning int32 operand $word into t0..t3, the weights (nibble j, nibble j + 4) of
    t_j as exact 16-bit floats (code - zero) * scale rounded once to `dtype` (see
    _dequant_rounded): 4 LOP3 + 3 shifts, 4 packed subtractions of the offset pair $offset,
    4 packed multiplies by the scale pair $scale. Needs .b32 t0..t3 and u declared."""
    bf16 = dtype == tl.bfloat16
    magic = "0x43004300" if bf16 else "0x64006400"
    ty = "bf16x2" if bf16 else "f16x2"
    return (
        f"lop3.b32 t0, ${word}, 0x000F000F, {magic}, 0xea;"
        f"shr.u32 u, ${word}, 4; lop3.b32 t1, u, 0x000F000F, {magic}, 0xea;"
        f"shr.u32 u, ${word}, 8; lop3.b32 t2, u, 0x000F000F, {magic}, 0xea;"
        f"shr.u32 u, ${word}, 12; lop3.b32 t3, u, 0x000F000F, {magic}, 0xea;"
        + "".join(f"sub.rn.{ty} t{j}, t{j}, ${offset};" for j in range(4))
        + "".join(f"mul.rn.{ty} t{j}, t{j}, ${scale};" for j in range(4))
    )


@triton.jit
def _packed_consts(words, scales, zeros, HAS_ZEROS: tl.constexpr, DTYPE: tl.constexpr):
    """(scale, 136 + zero) as 16-bit floats in both halves of an int32, shaped like words:
    the operands of the packed dequant. bf16: 128 + m has bits 0x4300 + m for m < 128; fp16:
    1024 + m has bits 0x6400 + m (offset 1032 + zero)."""
    if DTYPE == tl.bfloat16:
        s16 = scales.to(tl.bfloat16).to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF
        c16 = 0x4308
        if HAS_ZEROS:
            c16 = zeros.to(tl.int32) + 0x4308
    else:
        s16 = scales.to(tl.float16).to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF
        c16 = 0x6408
        if HAS_ZEROS:
            c16 = zeros.to(tl.int32) + 0x6408
    s2 = tl.broadcast_to(s16 * 0x10001, words.shape)  # the 16 bits in both halves
    c2 = tl.broadcast_to(c16 * 0x10001 + tl.zeros_like(s16), words.shape)
    return s2, c2


@triton.jit
def _prmt(a, b, SELECT: tl.constexpr):
    """PRMT: bytes of {b, a} picked by the selector's nibbles (0x5410: the low halves of a
    and b, 0x7632: their high halves)."""
    return tl.inline_asm_elementwise(
        f"prmt.b32 $0, $1, $2, {SELECT};", "=r,r,r", [a, b], dtype=tl.int32, is_pure=True,
        pack=1,
    )  # fmt: skip


@triton.jit
def _x_pairs(x_row, step, K, NG: tl.constexpr, WG: tl.constexpr, BLOCK_K: tl.constexpr,
             EVEN_K: tl.constexpr):  # fmt: skip
    """x at step `step`'s words w as 16-bit pairs (x[8w + j], x[8w + j + 4]) in int32, j = 0..3
    (the B operands of _mma_word), each [1, NG, WG]: four 32-bit loads of x's bits per word
    (x 4-byte aligned: the launcher sees to it) and one PRMT per pair; 0 outside K."""
    x32 = x_row.to(tl.pointer_type(tl.int32), bitcast=True) + step * (BLOCK_K // 2)
    w = (tl.arange(0, NG)[:, None] * WG + tl.arange(0, WG)[None, :])[None, :, :]
    ptrs = x32 + 4 * w
    if EVEN_K:
        a0 = tl.load(ptrs)
        a1 = tl.load(ptrs + 1)
        a2 = tl.load(ptrs + 2)
        a3 = tl.load(ptrs + 3)
    else:
        live = w < K // 8 - step * (BLOCK_K // 8)  # K is a multiple of 8 (whole words)
        a0 = tl.load(ptrs, mask=live, other=0)
        a1 = tl.load(ptrs + 1, mask=live, other=0)
        a2 = tl.load(ptrs + 2, mask=live, other=0)
        a3 = tl.load(ptrs + 3, mask=live, other=0)
    return (
        _prmt(a0, a2, 0x5410),
        _prmt(a0, a2, 0x7632),
        _prmt(a1, a3, 0x5410),
        _prmt(a1, a3, 0x7632),
    )


@triton.jit
def _mma_word(words, s2, c2, xp0, xp1, xp2, xp3, acc, DTYPE: tl.constexpr):
    """acc + (the quad's dot of its words with x), on the tensor cores: per word, the packed
    dequant (_dequant_asm) and two mma.sync m16n8k16 with fp32 accumulation.

    In the mma, lane 4g + t holds A rows g (registers 0, 2) and g + 8 (1, 3: zero here) and
    B column g (x); D[g, n] = sum over t' of lane (4g + t')'s A . lane (4n + t')'s B. The
    weight tile's layout (BLOCK_K = 128: 16 words a row, 4 per lane, so 4 lanes along K and
    8 rows per warp) puts lanes 4g..4g+3 on one weight row and gives lanes of the same t' the
    same K columns; x is the same for every row, so every D[g, n] is row g's dot with x over
    the quad's words: each of the 4 lanes of a quad holds it (the caller divides by 4). The
    static report checks that layout on the compiled kernel (benchmarks/sass_report.py).
    A register pairs weights (j, j + 4) of a word: t0 | t1 go with x pairs xp0 | xp1, then
    t2 | t3 with xp2 | xp3."""
    ty: tl.constexpr = "bf16" if DTYPE == tl.bfloat16 else "f16"
    mma: tl.constexpr = f"mma.sync.aligned.m16n8k16.row.col.f32.{ty}.{ty}.f32"
    asm: tl.constexpr = (
        "{ .reg .b32 t0, t1, t2, t3, u, z; .reg .f32 p, q1, q2, q3, zf;"
        "mov.b32 z, 0; mov.f32 zf, 0f00000000;"
        + _dequant_asm(DTYPE, 1, 2, 3)
        + f"{mma} {{p, q1, q2, q3}}, {{t0, z, t1, z}}, {{$4, $5}}, {{$8, $8, zf, zf}};"
        + f"{mma} {{$0, q1, q2, q3}}, {{t2, z, t3, z}}, {{$6, $7}}, {{p, q1, q2, q3}};"
        + "}"
    )
    return tl.inline_asm_elementwise(
        asm, "=f,r,r,r,r,r,r,r,f", [words, s2, c2, xp0, xp1, xp2, xp3, acc],
        dtype=tl.float32, is_pure=True, pack=1,
    )  # fmt: skip


@triton.constexpr_function
def _mma_rows_asm(dtype, blocks: int) -> str:
    """PTX of _mma_rows for `blocks` n8 blocks of x rows: the packed dequant once, then per
    block two mma.sync m16n8k16 (the t0 | t1 and t2 | t3 halves of the word) onto that block's
    accumulator pair. Operands: outputs $0..$(2B-1) (block b: c0, c1), then the word, the scale
    and offset pairs, 4 x pairs per block, 2 accumulators per block."""
    ty = "bf16" if dtype == tl.bfloat16 else "f16"
    mma = f"mma.sync.aligned.m16n8k16.row.col.f32.{ty}.{ty}.f32"
    word, xp, acc = 2 * blocks, 2 * blocks + 3, 6 * blocks + 3
    body = "".join(
        f"{mma} {{p0, p1, q2, q3}}, {{t0, z, t1, z}}, {{${xp + 4 * b}, ${xp + 4 * b + 1}}}, "
        f"{{${acc + 2 * b}, ${acc + 2 * b + 1}, zf, zf}};"
        f"{mma} {{${2 * b}, ${2 * b + 1}, q2, q3}}, {{t2, z, t3, z}}, "
        f"{{${xp + 4 * b + 2}, ${xp + 4 * b + 3}}}, {{p0, p1, q2, q3}};"
        for b in range(blocks)
    )
    return (
        "{ .reg .b32 t0, t1, t2, t3, u, z; .reg .f32 p0, p1, q2, q3, zf;"
        "mov.b32 z, 0; mov.f32 zf, 0f00000000;"
        + _dequant_asm(dtype, word, word + 1, word + 2)
        + body
        + "}"
    )


@triton.jit
def _mma_rows(words, s2, c2, xps, accs, DTYPE: tl.constexpr, BLOCKS: tl.constexpr):
    """accs + the words' products with up to 8 * BLOCKS rows of x, on the tensor cores: the
    swapped-operand small-M form of _mma_word (the weight the A operand, 16 rows of which 8
    carry data; x rows the B operand's 8 columns per block). The word is dequantised once for
    every row of x.

    B column n of an mma is supplied by lanes 4n + t'; in the weight tile's layout (checked by
    the report: 4 lanes along K, one weight row per lane group, row r on lane group r % 8)
    lane 4n + t' holds weight row r with r % 8 = n, so xps (loaded by _x_pairs_rows with the
    x row (r % 8) + 8 b for block b) put x row 8 b + n in column n, at the K columns of
    the lane's word, the same for all lanes of that t'. D[g, n] = row g's dot with x row
    8 b + n over the quad's words, and lane 4g + t gets D[g, 2t], D[g, 2t + 1] (c0, c1): x
    rows 8 b + 2t and 8 b + 2t + 1 for its weight row, t = the word's position along K // 4
    (_rows_out picks them out). xps: 4 pairs per block; accs: (c0, c1) per block."""
    if BLOCKS == 1:
        outs = tl.inline_asm_elementwise(
            _mma_rows_asm(DTYPE, 1), "=f,=f,r,r,r,r,r,r,r,f,f",
            [words, s2, c2, xps[0], xps[1], xps[2], xps[3], accs[0], accs[1]],
            dtype=(tl.float32,) * 2, is_pure=True, pack=1,
        )  # fmt: skip
    else:
        outs = tl.inline_asm_elementwise(
            _mma_rows_asm(DTYPE, 2), "=f,=f,=f,=f,r,r,r,r,r,r,r,r,r,r,r,f,f,f,f",
            [words, s2, c2, xps[0], xps[1], xps[2], xps[3], xps[4], xps[5], xps[6], xps[7],
             accs[0], accs[1], accs[2], accs[3]],
            dtype=(tl.float32,) * 4, is_pure=True, pack=1,
        )  # fmt: skip
    return outs


@triton.jit
def _x_pairs_rows(x_ptr, rows, M, stride_xm, step, K, NG: tl.constexpr, WG: tl.constexpr,
                  BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr):  # fmt: skip
    """_x_pairs for x row `rows` [BN, 1, 1] of each weight row, each pair [BN, NG, WG]: one
    128-bit load of the word's 8 x values (rows 16-byte aligned: the launcher sees to it) and
    4 PRMT, in inline PTX so the pairs take the weight tile's layout (a tl.load of them would
    be laid out for coalescing, and the mma, which follows its operands, with it). Rows
    >= M read row M - 1 instead (their B columns' results are never stored: an mma's
    columns are independent); words past K read as 0 (the weight there is not)."""
    r = tl.minimum(rows, M - 1).to(tl.int64)
    w = (tl.arange(0, NG)[:, None] * WG + tl.arange(0, WG)[None, :])[None, :, :]
    ptrs = x_ptr + r * stride_xm + step * BLOCK_K + 8 * w
    addr = ptrs.to(tl.int64, bitcast=True)
    pairs: tl.constexpr = (
        "prmt.b32 $0, a0, a2, 0x5410; prmt.b32 $1, a0, a2, 0x7632;"
        "prmt.b32 $2, a1, a3, 0x5410; prmt.b32 $3, a1, a3, 0x7632; }"
    )
    if EVEN_K:
        return tl.inline_asm_elementwise(
            "{ .reg .b32 a0, a1, a2, a3; ld.global.nc.v4.b32 {a0, a1, a2, a3}, [$4];" + pairs,
            "=r,=r,=r,=r,l", [addr], dtype=(tl.int32,) * 4, is_pure=True, pack=1,
        )  # fmt: skip
    live = (w < K // 8 - step * (BLOCK_K // 8)).to(tl.int32) + tl.zeros_like(r).to(tl.int32)
    return tl.inline_asm_elementwise(
        "{ .reg .b32 a0, a1, a2, a3; .reg .pred p; setp.ne.b32 p, $5, 0;"
        "mov.b32 a0, 0; mov.b32 a1, 0; mov.b32 a2, 0; mov.b32 a3, 0;"
        "@p ld.global.nc.v4.b32 {a0, a1, a2, a3}, [$4];" + pairs,
        "=r,=r,=r,=r,l,r", [addr, live], dtype=(tl.int32,) * 4, is_pure=True, pack=1,
    )  # fmt: skip


@triton.jit
def _rows_out(c0, c1, BLOCK_N: tl.constexpr):
    """[BN, 8] outputs (column 2t + j: x row 2t + j of the block) from one block's c0, c1
    [BN, NG, WG] (16 words a row): each lane's words summed (its position t = word // 4)."""
    s0 = tl.sum(tl.reshape(c0, (BLOCK_N, 4, 4)), axis=2)
    s1 = tl.sum(tl.reshape(c1, (BLOCK_N, 4, 4)), axis=2)
    return tl.reshape(tl.join(s0, s1), (BLOCK_N, 8))


@triton.jit
def w4a16_gemv_kernel(
    # tensors
    x_ptr,  # fp16/bf16/fp32 [M, K], unit stride along K
    qweight_ptr,  # int32 [N, K/8]: nibble j of word w is k = 8 w + j (low nibble first)
    scales_ptr,  # fp16/bf16/fp32 [N, K/G]
    zeros_ptr,  # int8 [N, K/G] signed zero-point codes, or None
    bias_ptr,  # [N] or None (added in the reduce kernel when SPLIT_K > 1)
    out_ptr,  # x.dtype [M, N] when SPLIT_K == 1, else fp32 partials [SPLIT_K, M, N]
    # sizes
    M,
    N,
    K,
    K_STEPS,  # cdiv(K, BLOCK_K)
    STEPS,  # K steps per split
    # strides (elements)
    stride_xm,
    stride_qn,  # words
    stride_sn,
    stride_zn,
    stride_om,
    stride_os,
    # meta
    GROUP_SIZE: tl.constexpr,
    HAS_ZEROS: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    SPLIT_K: tl.constexpr,
    EVEN_K: tl.constexpr,  # K % BLOCK_K == 0: no mask along K
    EVEN_N: tl.constexpr,  # N % BLOCK_N == 0: no mask along N
    INTERPRET: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    UNROLL: tl.constexpr,  # loop unroll factor (renames the prefetch registers)
    BLOCK_M: tl.constexpr = 1,  # rows of x per program: 1, or 8 / 16 on the tensor cores
):
    """out[m, n] = sum_k x[m, k] * w[n, k]; grid (M/BLOCK_M, N/BLOCK_N, SPLIT_K)."""
    BKW: tl.constexpr = BLOCK_K // 8
    NG: tl.constexpr = BLOCK_K // GROUP_SIZE if BLOCK_K > GROUP_SIZE else 1  # groups per tile
    WG: tl.constexpr = BKW // NG  # words per group within the tile
    row = tl.program_id(0).to(tl.int64)
    pid_n = tl.program_id(1)
    pid_k = tl.program_id(2)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_w = tl.arange(0, BKW)
    offs_g = tl.arange(0, NG)
    mask_n = offs_n < N
    kb = pid_k * STEPS
    kb_end = tl.minimum(kb + STEPS, K_STEPS)

    # int64 row offsets: N * K / 8 words can pass 2**31 (large vocab heads).
    w_rows = qweight_ptr + offs_n.to(tl.int64)[:, None] * stride_qn
    s_rows = scales_ptr + offs_n.to(tl.int64)[:, None] * stride_sn
    if HAS_ZEROS:
        z_rows = zeros_ptr + offs_n.to(tl.int64)[:, None] * stride_zn
    else:
        z_rows = s_rows  # unused
    x_row = x_ptr + row * stride_xm
    offs_x = offs_w[:, None] * 8 + tl.arange(0, 8)[None, :]

    # 16-bit activations: weights rounded to x's dtype as the reference (see _dequant_rounded);
    # fp32: exact (code - zero) * scale, the scale once per group
    ROUNDED: tl.constexpr = x_ptr.dtype.element_ty != tl.float32
    S_TY: tl.constexpr = scales_ptr.dtype.element_ty
    PACKED: tl.constexpr = (S_TY == x_ptr.dtype.element_ty) or (
        x_ptr.dtype.element_ty == tl.float16 and S_TY == tl.bfloat16
    )
    # tensor cores (_mma_word): 16-bit x and scales, 16 words a row (4 lanes along K)
    MMA: tl.constexpr = ROUNDED and PACKED and not INTERPRET and BLOCK_K == 128
    # BLOCK_M > 1: x rows row0 .. row0 + BLOCK_M - 1 in the mma's B columns (_mma_rows)
    tl.static_assert(BLOCK_M == 1 or MMA, "BLOCK_M > 1 needs the tensor-core path")
    BLOCKS: tl.constexpr = BLOCK_M // 8
    row0 = tl.program_id(0) * BLOCK_M
    rows_a = row0 + (tl.arange(0, BLOCK_N) % 8)[:, None, None]  # x row of lane group r % 8
    d0 = tl.zeros((BLOCK_N, NG, WG), dtype=tl.float32)
    d1 = tl.zeros((BLOCK_N, NG, WG), dtype=tl.float32)
    d2 = tl.zeros((BLOCK_N, NG, WG), dtype=tl.float32)
    d3 = tl.zeros((BLOCK_N, NG, WG), dtype=tl.float32)
    CH: tl.constexpr = 4 if WG % 4 == 0 and not MMA else 1  # words summed before the scale
    acc = tl.zeros((BLOCK_N, NG, WG // CH), dtype=tl.float32)
    # weights of step kb; in the loop, step + 1's are loaded before step's math (prefetch).
    # Past the last step the prefetch is predicated off (its address stays in bounds).
    last = kb_end - 1
    wn = _load_words(w_rows, offs_w, tl.minimum(kb, last), kb <= last, mask_n, K, EVEN_K,
                     EVEN_N, BLOCK_K)  # fmt: skip
    for step in tl.range(kb, kb_end, loop_unroll_factor=UNROLL):
        words = wn
        nxt = tl.minimum(step + 1, last)
        wn = _load_words(w_rows, offs_w, nxt, step < last, mask_n, K, EVEN_K, EVEN_N, BLOCK_K)
        scales, zeros, x = _load_side(s_rows, z_rows, x_row, offs_g, offs_x, step, mask_n, K,
                                      GROUP_SIZE, HAS_ZEROS, EVEN_K, EVEN_N, BLOCK_K, NG)  # fmt: skip
        words = tl.reshape(words, (BLOCK_N, NG, WG))
        if MMA:
            zz = zeros[:, :, None] if HAS_ZEROS else zeros
            s2, c2 = _packed_consts(words, scales[:, :, None], zz, HAS_ZEROS,
                                    x_ptr.dtype.element_ty)  # fmt: skip
            if BLOCK_M == 1:
                xp0, xp1, xp2, xp3 = _x_pairs(x_row, step, K, NG, WG, BLOCK_K, EVEN_K)
                acc = _mma_word(words, s2, c2, xp0, xp1, xp2, xp3, acc,
                                x_ptr.dtype.element_ty)  # fmt: skip
            else:
                xa = _x_pairs_rows(x_ptr, rows_a, M, stride_xm, step, K, NG, WG, BLOCK_K,
                                   EVEN_K)  # fmt: skip
                if BLOCKS == 1:
                    d0, d1 = _mma_rows(words, s2, c2, xa, (d0, d1), x_ptr.dtype.element_ty, 1)
                else:
                    xb = _x_pairs_rows(x_ptr, rows_a + 8, M, stride_xm, step, K, NG, WG,
                                       BLOCK_K, EVEN_K)  # fmt: skip
                    d0, d1, d2, d3 = _mma_rows(
                        words, s2, c2, (xa[0], xa[1], xa[2], xa[3], xb[0], xb[1], xb[2], xb[3]),
                        (d0, d1, d2, d3), x_ptr.dtype.element_ty, 2,
                    )  # fmt: skip
        elif ROUNDED:
            xs = _planes(x.to(tl.float32), BKW, NG, WG)
            x0, x1, x2, x3, x4, x5, x6, x7 = xs
            zz = zeros[:, :, None] if HAS_ZEROS else zeros
            w0, w1, w2, w3, w4, w5, w6, w7 = _dequant_rounded(
                words, scales[:, :, None], zz, HAS_ZEROS, x_ptr.dtype.element_ty,
                PACKED, INTERPRET,
            )  # fmt: skip
            part = w0 * x0
            part += w1 * x1
            part += w2 * x2
            part += w3 * x3
            part += w4 * x4
            part += w5 * x5
            part += w6 * x6
            part += w7 * x7
            acc += tl.sum(tl.reshape(part, (BLOCK_N, NG, WG // CH, CH)), axis=3)
        elif HAS_ZEROS:
            xs = _planes(x.to(tl.float32), BKW, NG, WG)
            zf = zeros.to(tl.float32)[:, :, None] + 8.0
            part = _word_dot(
                words, xs,
                zf + 8388608.0, zf + 524288.0, zf + 32768.0, zf + 2048.0, INTERPRET,
            )  # fmt: skip
        else:
            xs = _planes(x.to(tl.float32), BKW, NG, WG)
            part = _word_dot(
                words, xs,
                8388616.0, 524296.0, 32776.0, 2056.0, INTERPRET,
            )  # fmt: skip
        if not ROUNDED:
            part = tl.sum(tl.reshape(part, (BLOCK_N, NG, WG // CH, CH)), axis=3)
            acc += part * scales.to(tl.float32)[:, :, None]

    if BLOCK_M > 1:
        _store_rows(d0, d1, d2, d3, out_ptr, bias_ptr, offs_n, mask_n, row0, M, pid_k,
                    stride_om, stride_os, HAS_BIAS, SPLIT_K, BLOCK_N, BLOCK_M, INTERPRET)  # fmt: skip
        return
    out_row = tl.sum(tl.sum(acc, axis=2), axis=1)
    if MMA:
        out_row = out_row * 0.25  # the 4 lanes of a quad each hold the quad's sum (exact)
    if SPLIT_K == 1:
        if HAS_BIAS:
            out_row += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)
        out = out_ptr + row * stride_om + offs_n
        tl.store(out, cast_rne(out_row, out_ptr.dtype.element_ty, INTERPRET), mask=mask_n)
    else:
        out = out_ptr + pid_k * stride_os + row * stride_om + offs_n
        tl.store(out, out_row, mask=mask_n)


@triton.jit
def _store_rows(d0, d1, d2, d3, out_ptr, bias_ptr, offs_n, mask_n, row0, M, pid_k, stride_om,
                stride_os, HAS_BIAS: tl.constexpr, SPLIT_K: tl.constexpr,
                BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, INTERPRET: tl.constexpr):  # fmt: skip
    """Store the BLOCK_M rows' outputs (rows >= M dropped) from _mma_rows's accumulators:
    the tile out[row0 + c, offs_n], or its split-K partials."""
    o = _rows_out(d0, d1, BLOCK_N)
    if BLOCK_M == 16:  # columns 8 b + c: block b's column c
        o = tl.reshape(tl.permute(tl.join(o, _rows_out(d2, d3, BLOCK_N)), (0, 2, 1)),
                       (BLOCK_N, 16))  # fmt: skip
    cols = row0 + tl.arange(0, BLOCK_M)
    mask = mask_n[:, None] & (cols < M)[None, :]
    ptrs = offs_n[:, None] + cols.to(tl.int64)[None, :] * stride_om
    if SPLIT_K == 1:
        if HAS_BIAS:
            o += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[:, None]
        tl.store(out_ptr + ptrs, cast_rne(o, out_ptr.dtype.element_ty, INTERPRET), mask=mask)
    else:
        tl.store(out_ptr + pid_k * stride_os + ptrs, o, mask=mask)


@triton.jit
def _bounds(step, valid, offs, K, UNIT: tl.constexpr, PER_STEP: tl.constexpr,
            EVEN_K: tl.constexpr):  # fmt: skip
    """offs < the count of units (words, groups, elements) of step `step` inside K; all
    false where `valid` is false (the prefetch past the last step)."""
    if EVEN_K:
        lim = tl.where(valid, PER_STEP, 0)
    else:
        lim = tl.where(valid, tl.cdiv(K, UNIT) - step * PER_STEP, 0)
    return offs < lim


@triton.jit
def _load_words(w_rows, offs_w, step, live, mask_n, K, EVEN_K: tl.constexpr,
                EVEN_N: tl.constexpr, BLOCK_K: tl.constexpr):  # fmt: skip
    """Step `step`'s weight words [BN, BKW] (zero outside [N, K]); nothing is read where
    `live` is false (the prefetch past a split's last step: those registers go unused)."""
    ptrs = w_rows + step * (BLOCK_K // 8) + offs_w[None, :]
    mask = _bounds(step, live, offs_w, K, 8, BLOCK_K // 8, EVEN_K)[None, :]
    if EVEN_K and EVEN_N:
        return tl.load(ptrs, mask=mask, eviction_policy="evict_first")
    if not EVEN_N:
        mask = mask & mask_n[:, None]
    return tl.load(ptrs, mask=mask, other=0, eviction_policy="evict_first")


@triton.jit
def _load_side(s_rows, z_rows, x_row, offs_g, offs_x, step, mask_n, K,
               GROUP_SIZE: tl.constexpr, HAS_ZEROS: tl.constexpr, EVEN_K: tl.constexpr,
               EVEN_N: tl.constexpr, BLOCK_K: tl.constexpr, NG: tl.constexpr):  # fmt: skip
    """Step `step`'s scales and zeros [BN, NG] and x [BKW, 8] (zero outside [N, K])."""
    g0 = (step * BLOCK_K) // GROUP_SIZE
    mg = _bounds(step, True, offs_g, K, GROUP_SIZE, NG, EVEN_K)[None, :]
    if not EVEN_N:
        mg = mg & mask_n[:, None]
    scales = tl.load(s_rows + g0 + offs_g[None, :], mask=mg, other=0.0)
    if HAS_ZEROS:
        zeros = tl.load(z_rows + g0 + offs_g[None, :], mask=mg, other=0)
    else:
        zeros = scales  # unused
    mask_x = _bounds(step, True, offs_x, K, 1, BLOCK_K, EVEN_K)
    x = tl.load(x_row + step * BLOCK_K + offs_x, mask=mask_x, other=0.0)
    return scales, zeros, x


def gemv_mma(x: torch.Tensor, scales: torch.Tensor) -> bool:
    """Whether the GEMV runs on the tensor cores for these operands (the kernel's MMA constexpr,
    less the tile): 16-bit x, scales exact in x's dtype, not under the interpreter."""
    if x.dtype not in (torch.bfloat16, torch.float16) or interpreting():
        return False
    return scales.dtype == x.dtype or (x.dtype == torch.float16 and scales.dtype == torch.bfloat16)


def w4a16_gemv(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor | None,
    *,
    group_size: int,
    bias: torch.Tensor | None = None,
    split_k: int | None = None,
    plan: GemvPlan | None = None,
) -> torch.Tensor:
    """x [M, K] (unit stride along K) @ W.T for checked, contiguous packed inputs; group_size
    is the resolved G. `plan` defaults to `plan_gemv` for these shapes on x's device (with
    `split_k` forced when given: tests cover both paths). A plan of several rows per program
    (block_m > 1) where the tensor cores are out (`gemv_mma`) is re-planned a row per program;
    one of 16 rows with zero points, 8 rows a program (16 rows and the zero points' offset
    pairs pass 255 registers and spill, static report; the two programs of an N tile are
    neighbours in the grid, so the second reads the weights mostly from L2)."""
    m, k = x.shape
    n = qweight.shape[0]
    if plan is None:
        plan = plan_gemv(m, n, k, group_size, num_sms(x.device), split_k)
    rows = plan.block_m if gemv_mma(x, scales) else 1
    if rows > 8 and zeros is not None:
        rows = 8
    if rows != plan.block_m:
        plan = plan_gemv(m, n, k, group_size, num_sms(x.device), split_k, rows)
    split_k = plan.split_k
    # the tensor-core path reads x as 32-bit pairs (_x_pairs: 4-byte aligned rows) or, several
    # rows a program, 128 bits a word (_x_pairs_rows: 16-byte aligned rows)
    align = 8 if plan.block_m > 1 else 2
    if x.element_size() == 2 and (x.storage_offset() % align or x.stride(0) % align):
        x = torch.empty_like(x, memory_format=torch.contiguous_format).copy_(x)
    out, stride_os = splitk_output(x, m, n, split_k)
    launch(
        w4a16_gemv_kernel,
        plan.grid,
        dict(
            x_ptr=x,
            qweight_ptr=qweight,
            scales_ptr=scales,
            zeros_ptr=zeros,
            bias_ptr=bias,
            out_ptr=out,
            M=m,
            N=n,
            K=k,
            K_STEPS=plan.k_steps,
            STEPS=plan.steps,
            stride_xm=x.stride(0),
            stride_qn=qweight.stride(0),
            stride_sn=scales.stride(0),
            stride_zn=0 if zeros is None else zeros.stride(0),
            stride_om=n,
            stride_os=stride_os,
            GROUP_SIZE=group_size,
            HAS_ZEROS=zeros is not None,
            HAS_BIAS=bias is not None,
            SPLIT_K=split_k,
            EVEN_K=k % plan.block_k == 0,
            EVEN_N=n % plan.block_n == 0,
            INTERPRET=interpreting(),
            BLOCK_N=plan.block_n,
            BLOCK_K=plan.block_k,
            UNROLL=2,
            BLOCK_M=plan.block_m,
            num_warps=plan.num_warps,
            num_stages=1,
        ),
    )
    if split_k == 1:
        return out
    return splitk_reduce(out, bias=bias, dtype=x.dtype)
