// W4A16 and FP4 matmul on x86 CPUs with AVX-512 (BW + BF16), reading qatpass's canonical packed
// formats (qatpass/scheme.py, qatpass/scheme_fp4.py).
//
//   y[m, n] = sum_k x[m, k] * value(nibble[n, k]) * scale[n, k / g]  (+ bias[n])
//
// Weights: qweight bytes [N, K/2], byte j of a row holds k = 2j (low nibble) and 2j + 1 (high).
// INT4 (scale_kind 0/1/2: scales bf16, fp16 or fp32 [N, K/g]): value = nibble - 8 - zero, zeros
// int8 [N, K/g] (signed codes) or NULL (symmetric); K % 32 == 0; g % 32 == 0, a power of two or K.
// FP4 (zeros NULL): value = the E2M1 code's value (sign bit 8 | magnitude index 0..7 of 0, 0.5,
// 1, 1.5, 2, 3, 4, 6), scale bytes [N, K/g] decoded here, exactly: scale_kind 3 NVFP4 (g = 16,
// FP8 E4M3, scale = e4m3 / global_scale, an IEEE division as the scheme's), 4 MXFP4 (g = 32,
// E8M0, scale = 2**(e - 127)); K % 16 == 0 (NVFP4) or 32. Every value is exact in bf16, so FP4 is
// the same decode with another 16-entry table; its scales are applied per lane like INT4's.
//
// bf16 activations work on blocks of 128 weights, one 64-byte line of nibbles: loaded as 32
// 16-bit words, word j holds k = 4j .. 4j + 3 in its four nibbles. Four table permutes
// (vpermw reads an index's low 5 bits, so the 32-entry table repeats its 16 values and the
// next nibble's bit is ignored) of the word shifted by 0, 4, 8, 12 give the bf16 value of
// (code - zero) for k = 4j + r, r = 0..3 (small integers, exact in bf16). x is rearranged to
// the same order (`arrange_bf16`: per block, [4][32] with [r][j] = x[128b + 4j + r]), four
// vdpbf16ps take the dot product in fp32 (bf16 x bf16 products are exact in fp32): lane i sums
// k = 128b + 8i .. 8i + 7, inside one group, and one fma applies the block's scales (one
// permute of the block's 1, 2, 4 or 8 scales). That is 13 vector instructions per 64-byte line.
// FP4's scale bytes are decoded 16 at a time, for a chunk of blocks (two NVFP4 ones, four MXFP4
// ones) per row: E8M0 into fp32's exponent field; E4M3 widened exactly through fp16, and its
// quotient by the global scale read from a 16-entry table that equals the IEEE division bit for
// bit (make_dec; vdivps where the table's range condition fails).
// Asymmetric tables hold up to four groups (vpermt2w, 64 entries, the group in index bits 4-5).
//
// Paths: M <= 4 streams four weight rows at once (one from each quarter of N: four streams,
// measured faster than two; two adjacent rows were slower still), each block decoded once for
// every row of x, with the same sum order as M = 1; M > 4 decodes a weight block
// once per tile of up to MT rows of x and two weight rows; `qp_w4a16_gemm_bf16` (larger M, see
// its section) decodes the weight once per call into strips for a register-blocked GEMM. Rows n
// are split across OpenMP threads; each output's sum has a fixed order, so results do not
// depend on the thread count.
//
// Built and loaded by qatpass/kernels/cpu/native.py (which checks qp_cpu_supported() first and
// validates every argument: the code here trusts shapes, strides and pointers).

#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define KB 128               // weights per block (64 bytes of nibbles)
#define NS 4                 // weight rows streamed at once when M <= MS (one per slice of N)
#define MS 4                 // rows of x that share the four streams (small-batch decode)
_Static_assert(MS == 4, "m1_rows dispatches 1 to 4 rows of x");
#define MT 8                 // rows of x per pass over a weight block (accumulators in registers)
#define RB 64                // weight rows per block of work (one OpenMP task) when M > MS
#define X_TILE_BYTES 16384   // arranged x kept in L1 while a block of weight rows streams past
#define PREFETCH_BYTES 1024 // weights requested this far ahead on each stream (tiles)
#define M1_PREFETCH_BYTES 512  // the same on each of M <= MS's four streams
#define SMALL_X_BYTES (1 << 20)  // arranged x up to this size lives in a per-thread buffer

// scale_kind: INT4 scales stored as bf16 / fp16 / fp32, or FP4 scale bytes
enum { S_BF16, S_F16, S_F32, S_E4M3, S_E8M0, S_KINDS };
#define IS_FP4(kind) ((kind) >= S_E4M3)

// bf16 of the E2M1 codes 0..15 (code 8 is -0), twice: vpermw reads an index's low 5 bits
static const uint16_t E2M1_BF16[32] __attribute__((aligned(64))) = {
    0x0000, 0x3F00, 0x3F80, 0x3FC0, 0x4000, 0x4040, 0x4080, 0x40C0,
    0x8000, 0xBF00, 0xBF80, 0xBFC0, 0xC000, 0xC040, 0xC080, 0xC0C0,
    0x0000, 0x3F00, 0x3F80, 0x3FC0, 0x4000, 0x4040, 0x4080, 0x40C0,
    0x8000, 0xBF00, 0xBF80, 0xBFC0, 0xC000, 0xC040, 0xC080, 0xC0C0};

int qp_cpu_supported(void) {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512bf16") && __builtin_cpu_supports("f16c");
}

// The compute limit the benchmark prints beside the batched figures: on each of nthreads threads,
// iters rounds of 12 register-only vdpbf16ps into 12 independent accumulators (12 * iters
// instructions of 32 multiply-adds each per thread). In asm so that no compiler keeps the
// accumulators in memory. Returns a sum of them, for the caller to ignore.
float qp_bf16_dot_peak(int64_t iters, int nthreads) {
  float total = 0.0f;
#pragma omp parallel num_threads(nthreads) reduction(+ : total)
  {
    int64_t left = iters;
    float out;
    __asm__ volatile(
        "vpxord %%zmm0, %%zmm0, %%zmm0\n\tvmovaps %%zmm0, %%zmm1\n\tvmovaps %%zmm0, %%zmm2\n\t"
        "vmovaps %%zmm0, %%zmm3\n\tvmovaps %%zmm0, %%zmm4\n\tvmovaps %%zmm0, %%zmm5\n\t"
        "vmovaps %%zmm0, %%zmm6\n\tvmovaps %%zmm0, %%zmm7\n\tvmovaps %%zmm0, %%zmm8\n\t"
        "vmovaps %%zmm0, %%zmm9\n\tvmovaps %%zmm0, %%zmm10\n\tvmovaps %%zmm0, %%zmm11\n\t"
        "vpternlogd $0xff, %%zmm12, %%zmm12, %%zmm12\n\tvpsrld $18, %%zmm12, %%zmm12\n\t"
        "1:\n\t"
        "vdpbf16ps %%zmm12, %%zmm12, %%zmm0\n\tvdpbf16ps %%zmm12, %%zmm12, %%zmm1\n\t"
        "vdpbf16ps %%zmm12, %%zmm12, %%zmm2\n\tvdpbf16ps %%zmm12, %%zmm12, %%zmm3\n\t"
        "vdpbf16ps %%zmm12, %%zmm12, %%zmm4\n\tvdpbf16ps %%zmm12, %%zmm12, %%zmm5\n\t"
        "vdpbf16ps %%zmm12, %%zmm12, %%zmm6\n\tvdpbf16ps %%zmm12, %%zmm12, %%zmm7\n\t"
        "vdpbf16ps %%zmm12, %%zmm12, %%zmm8\n\tvdpbf16ps %%zmm12, %%zmm12, %%zmm9\n\t"
        "vdpbf16ps %%zmm12, %%zmm12, %%zmm10\n\tvdpbf16ps %%zmm12, %%zmm12, %%zmm11\n\t"
        "dec %0\n\tjnz 1b\n\t"
        "vaddps %%zmm1, %%zmm0, %%zmm0\n\tvaddps %%zmm11, %%zmm0, %%zmm0\n\t"
        "vmovss %%xmm0, %1"
        : "+r"(left), "=m"(out)
        :
        : "cc", "xmm0", "xmm1", "xmm2", "xmm3", "xmm4", "xmm5", "xmm6", "xmm7", "xmm8", "xmm9",
          "xmm10", "xmm11", "xmm12");
    total += out;
  }
  return total;
}

// fp32 -> bf16 bits, round to nearest even (as torch does), NaN kept quiet.
static inline uint16_t to_bf16(float f) {
  uint32_t u;
  memcpy(&u, &f, sizeof u);
  if (isnan(f)) return (uint16_t)((u >> 16) | 0x40);
  u += 0x7FFF + ((u >> 16) & 1);
  return (uint16_t)(u >> 16);
}

// ---- arranged activations -------------------------------------------------------------------

// Scratch for arranged x: per calling thread, grown on demand, kept while small.
static __thread void* scratch_ptr;
static __thread size_t scratch_size;

static void* scratch(size_t bytes, int* owned) {
  *owned = bytes > SMALL_X_BYTES;
  if (*owned) return aligned_alloc(64, (bytes + 63) & ~(size_t)63);
  if (scratch_size < bytes) {
    free(scratch_ptr);
    scratch_ptr = aligned_alloc(64, SMALL_X_BYTES);
    scratch_size = scratch_ptr ? SMALL_X_BYTES : 0;
  }
  return scratch_ptr;
}

// x bf16 [M, K] (row stride ldx) -> out [M, B, 4, 32], B = ceil(K / 128):
// out[m, b, r, j] = x[m, 128b + 4j + r], zero past K.
void qp_arrange_bf16(const uint16_t* x, int64_t ldx, int64_t m, int64_t k, uint16_t* out) {
  const int64_t blocks = (k + KB - 1) / KB;
  uint16_t idx_w[32];
  for (int j = 0; j < 32; ++j) idx_w[j] = (uint16_t)(4 * (j % 16));
  const __m512i base = _mm512_loadu_si512(idx_w);
  for (int64_t i = 0; i < m; ++i) {
    const uint16_t* xr = x + i * ldx;
    uint16_t* o = out + i * blocks * KB;
    for (int64_t b = 0; b < blocks; ++b) {
      __m512i v[4];
      for (int q = 0; q < 4; ++q) {
        const int64_t k0 = b * KB + 32 * q;
        const int64_t left = k - k0;
        const __mmask32 mask = left >= 32 ? 0xFFFFFFFFu : left <= 0 ? 0 : (1u << left) - 1;
        v[q] = _mm512_maskz_loadu_epi16(mask, xr + (left > 0 ? k0 : 0));
      }
      for (int r = 0; r < 4; ++r) {
        const __m512i idx = _mm512_add_epi16(base, _mm512_set1_epi16((short)r));
        const __m512i lo = _mm512_permutex2var_epi16(v[0], idx, v[1]);  // j < 16
        const __m512i hi = _mm512_permutex2var_epi16(v[2], idx, v[3]);  // j >= 16
        _mm512_storeu_si512(o + b * KB + 32 * r, _mm512_mask_blend_epi16(0xFFFF0000u, lo, hi));
      }
    }
  }
}

// x fp32 [M, K] (row stride ldx) -> [M, Q, 2, 16], Q = ceil(K / 32): [q][0][j] = x[32q + 2j],
// [q][1][j] = x[32q + 2j + 1], zero past K (K % 32 == 16: the last half step).
static void arrange_f32(const float* x, int64_t ldx, int64_t m, int64_t k, float* out) {
  int32_t even[16], odd[16];
  for (int j = 0; j < 16; ++j) even[j] = 2 * j, odd[j] = 2 * j + 1;
  const __m512i ie = _mm512_loadu_si512(even), io = _mm512_loadu_si512(odd);
  const int64_t nq = (k + 31) / 32;
  for (int64_t i = 0; i < m; ++i)
    for (int64_t q = 0; q < nq; ++q) {
      const __mmask16 hb = 32 * q + 32 <= k ? 0xFFFF : 0;  // the second 16 inside K
      const __m512 a = _mm512_loadu_ps(x + i * ldx + 32 * q);
      const __m512 b = _mm512_maskz_loadu_ps(hb, x + i * ldx + 32 * q + 16);
      _mm512_storeu_ps(out + (i * nq + q) * 32, _mm512_permutex2var_ps(a, ie, b));
      _mm512_storeu_ps(out + (i * nq + q) * 32 + 16, _mm512_permutex2var_ps(a, io, b));
    }
}

// ---- bf16 decode ----------------------------------------------------------------------------

// Per-call constants: the group layout of a block and the tables.
typedef struct {
  __m512i lut;        // symmetric: bf16 of value(i % 16), i < 32 (INT4 i % 16 - 8, FP4 E2M1)
  __m512 base;        // fp32 value(i), i < 16
  __m512 gscale;      // NVFP4's global scale in every lane (1 otherwise)
  __m512 e4m3_tab;    // NVFP4, lane i: 2**8 * fl((1 + (i % 8) / 8) / gscale)
  int e4m3_by_table;  // NVFP4: e4m3 / gscale through e4m3_tab (exact for this gscale), else vdivps
  __m512i lane_grp;   // epi32 lane i: the group of k = 8i within a block (0 .. GPB-1)
  __m256i lane_grp16; // the same as 16 words
  __m512i word_grp;   // epi16 word j: (group of k = 4j) << 4, for the asymmetric index
  __m512i word_lo;    // epi32 lane i: the group of word i (k = 4i), decode to fp32
  __m512i word_hi;    // epi32 lane i: the group of word 16 + i
  int64_t k, blocks, groups;
  int shift;          // group = k >> shift (62 per channel: always group 0)
  __mmask32 tail_words;  // words of the last block that lie inside K
  __mmask16 full_groups, tail_groups;  // scale lanes to load per block
} Dec;

static Dec make_dec(int64_t k, int64_t g, int kind, float gscale) {
  Dec d;
  d.k = k;
  const float gs = IS_FP4(kind) ? gscale : 1.0f;
  d.gscale = _mm512_set1_ps(gs);
  // Every E4M3 value v is +-2**E * (1 + m/8) (m < 8; the subnormals too, as fp32) or 0, and an
  // IEEE division's rounding commutes with powers of two while operands and results stay normal:
  // v / gs == +-2**E * fl((1 + m/8) / gs). With 2**-118 <= |gs| <= 2**117 every quotient
  // (|v| in [2**-9, 448]) and table entry is a normal fp32, so the table gives the division's
  // result bit for bit at a multiply instead of a vdivps (the divider bounded the M = 1 speed).
  // (The entries carry the 2**8 that e4m3_f32_over_256 leaves out: still normal in that range.)
  float tab[16];
  for (int i = 0; i < 16; ++i) tab[i] = (1.0f + (float)(i % 8) / 8.0f) / gs * 256.0f;
  d.e4m3_tab = _mm512_loadu_ps(tab);
  d.e4m3_by_table = fabsf(gs) >= 0x1p-118f && fabsf(gs) <= 0x1p117f;
  d.blocks = (k + KB - 1) / KB;
  d.groups = k / g;
  int shift = 62;
  if (g < k) {
    shift = 0;
    while (((int64_t)1 << shift) < g) ++shift;
  }
  d.shift = shift;
  uint16_t lut[32], wg[32];
  float codes[16];
  int32_t lg[16], wlo[16], whi[16];
  for (int i = 0; i < 32; ++i) {
    const float v = (float)(i % 16 - 8);
    uint32_t bits;
    memcpy(&bits, &v, sizeof bits);
    lut[i] = (uint16_t)(bits >> 16);  // bf16 of a small integer: its fp32 bits >> 16
    wg[i] = (uint16_t)((shift >= 62 ? 0 : (4 * i) >> shift) << 4);
  }
  for (int i = 0; i < 16; ++i) {
    codes[i] = (float)(i - 8);
    lg[i] = shift >= 62 ? 0 : (8 * i) >> shift;
    wlo[i] = shift >= 62 ? 0 : (4 * i) >> shift;
    whi[i] = shift >= 62 ? 0 : (4 * (i + 16)) >> shift;
  }
  d.lut = IS_FP4(kind) ? _mm512_load_si512(E2M1_BF16) : _mm512_loadu_si512(lut);
  d.word_grp = _mm512_loadu_si512(wg);
  if (IS_FP4(kind))  // bf16 -> fp32 is exact: the bits << 16
    for (int i = 0; i < 16; ++i) {
      const uint32_t bits = (uint32_t)E2M1_BF16[i] << 16;
      memcpy(&codes[i], &bits, sizeof bits);
    }
  d.base = _mm512_loadu_ps(codes);
  d.lane_grp = _mm512_loadu_si512(lg);
  d.lane_grp16 = _mm512_cvtepi32_epi16(d.lane_grp);
  d.word_lo = _mm512_loadu_si512(wlo);
  d.word_hi = _mm512_loadu_si512(whi);
  const int gpb = shift >= 7 ? 1 : KB >> shift;
  d.full_groups = (__mmask16)((1u << gpb) - 1);
  const int64_t tail = k - (d.blocks - 1) * KB;  // a multiple of 16 (of 32 for INT4)
  d.tail_words = tail >= KB ? 0xFFFFFFFFu : (1u << (tail / 4)) - 1;
  const int64_t tail_groups = shift >= 62 ? 1 : (tail + g - 1) / g;
  d.tail_groups = (__mmask16)((1u << (tail_groups < gpb ? tail_groups : gpb)) - 1);
  return d;
}

static inline int gpb_of(const Dec* d) { return d->shift >= 7 ? 1 : KB >> d->shift; }

// ---- scales ---------------------------------------------------------------------------------

// 16 FP8 E4M3 bytes -> fp32, exactly: sign-extended to 16 bits and shifted left by 7, the sign
// lands in fp16's sign bit and the exponent and mantissa in fp16's fields (bit 14 cleared); fp16's
// exponent bias is 15, E4M3's 7, so that fp16 is the E4M3 value * 2**-8, subnormals included,
// and vcvtph2ps widens it exactly. Returns value * 2**-8. (The NaN byte never occurs.)
static inline __m512 e4m3_f32_over_256(__m128i bytes) {
  const __m256i h = _mm256_slli_epi16(_mm256_cvtepi8_epi16(bytes), 7);
  return _mm512_cvtph_ps(_mm256_and_si256(h, _mm256_set1_epi16((short)0xBF80)));
}

// E8M0 bytes e (one per epi32 lane) -> fp32 2**(e - 127): e in the exponent field, and e = 0
// the fp32 subnormal 2**-127. (255, NaN, never occurs.)
static inline __m512 e8m0_f32(__m512i e) {
  const __mmask16 zero = _mm512_cmpeq_epi32_mask(e, _mm512_setzero_si512());
  return (__m512)_mm512_mask_blend_epi32(zero, _mm512_slli_epi32(e, 23),
                                         _mm512_set1_epi32(1 << 22));
}

// Scales at..at + 15 of a scale array as fp32 (lanes outside `mask` zero): what each group's
// sum is multiplied by. NVFP4: e4m3 / gscale, the scheme's IEEE fp32 division (see make_dec).
static inline __attribute__((always_inline)) __m512 scales16(const void* scales, int kind,
                                                             int64_t at, __mmask16 mask,
                                                             const Dec* d) {
  if (kind == S_F32) return _mm512_maskz_loadu_ps(mask, (const float*)scales + at);
  if (IS_FP4(kind)) {
    const __m128i bytes = _mm_maskz_loadu_epi8(mask, (const uint8_t*)scales + at);
    if (kind == S_E8M0) return _mm512_maskz_mov_ps(mask, e8m0_f32(_mm512_cvtepu8_epi32(bytes)));
    const __m512 v = e4m3_f32_over_256(bytes);  // lanes outside mask: 0, and 0 / gscale = 0
    if (!d->e4m3_by_table) return _mm512_div_ps(_mm512_mul_ps(v, _mm512_set1_ps(256.0f)), d->gscale);
    // +-2**(E - 8) (v's sign and exponent bits) times the entry of m (bits 20-22; vpermps reads
    // the low 4 index bits, and the table repeats its 8 values)
    const __m512 frac = _mm512_permutexvar_ps(_mm512_srli_epi32((__m512i)v, 20), d->e4m3_tab);
    const __m512 pow2 = (__m512)_mm512_and_si512((__m512i)v, _mm512_set1_epi32((int)0xFF800000u));
    return _mm512_mul_ps(pow2, frac);
  }
  const __m256i h = _mm256_maskz_loadu_epi16(mask, (const uint16_t*)scales + at);
  if (kind == S_F16) return _mm512_cvtph_ps(h);
  return (__m512)_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16);
}

// Bytes per stored scale.
static inline int scale_bytes(int kind) { return kind == S_F32 ? 4 : IS_FP4(kind) ? 1 : 2; }

// One weight row: where it lives.
typedef struct {
  const uint8_t* w;
  const char* s;
  const int8_t* z;
} Row;

static inline Row row_at(const uint8_t* qweight, const void* scales, const int8_t* zeros,
                         int64_t row, const Dec* d, int kind) {
  Row r = {qweight + row * (d->k / 2), (const char*)scales + row * d->groups * scale_bytes(kind),
           zeros ? zeros + row * d->groups : NULL};
  return r;
}

// The first group of block b; gpb (groups per block, a compile-time constant after inlining)
// of 4 or 2 fixes the shift, so the loop keeps no variable shift.
static inline __attribute__((always_inline)) int64_t first_group(const Dec* d, int64_t b,
                                                                 const int gpb) {
  if (gpb > 1) return b * gpb;
  return d->shift >= 62 ? 0 : (b * KB) >> d->shift;
}

// FP4: blocks per decoded chunk of 16 scales (NVFP4 2, MXFP4 4; per channel 1).
static inline __attribute__((always_inline)) int fp4_chunk(const int gpb) {
  return gpb == 1 ? 1 : 16 / gpb;
}

// FP4: the 16 scales (as fp32) from the first group of block b, which starts a chunk.
static inline __attribute__((always_inline)) __m512 fp4_scales(const Row* r, const Dec* d,
                                                               int64_t b, const int kind,
                                                               const int gpb) {
  const int64_t at = first_group(d, b, gpb), left = d->groups - at;
  return scales16(r->s, kind, at, left >= 16 ? 0xFFFF : (__mmask16)((1u << left) - 1), d);
}

// The block's scales as fp32, lane i = scale of the group holding k = 128b + 8i. FP4 decodes the
// 16 scales of a chunk of blocks (fp4_chunk) into *held at its first block (or at b0, the first
// block of the pass), and the chunk's other blocks read theirs from there.
static inline __attribute__((always_inline)) __m512 block_scales(const Row* r, const Dec* d,
                                                                 int64_t b, int64_t b0,
                                                                 __mmask16 gm, __m512* held,
                                                                 const int kind, const int gpb) {
  if (IS_FP4(kind)) {
    const int per = fp4_chunk(gpb);
    const int64_t c0 = b - b % per;
    if (b == c0 || b == b0) *held = fp4_scales(r, d, c0, kind, gpb);
    const __m512i lanes = _mm512_add_epi32(d->lane_grp, _mm512_set1_epi32((int)(b - c0) * gpb));
    return _mm512_permutexvar_ps(lanes, *held);
  }
  const int64_t g0 = first_group(d, b, gpb);
  if (kind == 2) {
    const __m512 s = _mm512_maskz_loadu_ps(gm, (const float*)r->s + g0);
    return _mm512_permutexvar_ps(d->lane_grp, s);
  }
  if (kind == 1) {
    const __m256i h = _mm256_maskz_loadu_epi16(gm, (const uint16_t*)r->s + g0);
    return _mm512_cvtph_ps(_mm256_permutexvar_epi16(d->lane_grp16, h));
  }
  const __m512i s = _mm512_maskz_loadu_epi16((__mmask32)gm, (const uint16_t*)r->s + g0);
  // bf16: its bits in the high half of each fp32 lane, zero below
  return (__m512)_mm512_maskz_permutexvar_epi16(0xAAAAAAAAu, _mm512_slli_epi32(d->lane_grp, 16),
                                                s);
}

// The block's zeros as fp32 lanes 0..GPB-1.
static inline __attribute__((always_inline)) __m512 block_zeros(const Row* r, const Dec* d,
                                                                int64_t b, __mmask16 gm,
                                                                const int gpb) {
  const __m128i z = _mm_maskz_loadu_epi8(gm, r->z + first_group(d, b, gpb));
  return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(z));
}

static inline __m512 lane_bcast(__m512 v, int q) {
  return _mm512_permutexvar_ps(_mm512_set1_epi32(q), v);
}

// The 128 weights of block b as bf16 (code - zero): out[r] word j = k 128b + 4j + r.
static inline __attribute__((always_inline)) void decode_block(const Row* r, const Dec* d,
                                                               int64_t b, __m512bh out[4],
                                                               const int asym, const int gpb) {
  const int last = b == d->blocks - 1;
  const __m512i w = last ? _mm512_maskz_loadu_epi16(d->tail_words, r->w + b * 64)
                         : _mm512_loadu_si512(r->w + b * 64);
  const __m512i sh[4] = {w, _mm512_srli_epi16(w, 4), _mm512_srli_epi16(w, 8),
                         _mm512_srli_epi16(w, 12)};
  if (!asym) {
    for (int q = 0; q < 4; ++q) out[q] = (__m512bh)_mm512_permutexvar_epi16(sh[q], d->lut);
    return;
  }
  const __m512 z = block_zeros(r, d, b, last ? d->tail_groups : d->full_groups, gpb);
  const __m512 t0 = _mm512_sub_ps(d->base, lane_bcast(z, 0));
  if (gpb == 1) {
    const __m512i table = (__m512i)_mm512_cvtne2ps_pbh(t0, t0);
    for (int q = 0; q < 4; ++q) out[q] = (__m512bh)_mm512_permutexvar_epi16(sh[q], table);
    return;
  }
  const __m512i mask = _mm512_set1_epi16(0xF);
  const __m512 t1 = _mm512_sub_ps(d->base, lane_bcast(z, 1));
  const __m512i ta = (__m512i)_mm512_cvtne2ps_pbh(t1, t0);  // entries 16q + u, q = 0, 1
  if (gpb == 2) {
    for (int q = 0; q < 4; ++q) {
      const __m512i idx = _mm512_ternarylogic_epi32(sh[q], mask, d->word_grp, 0xEA);  // a&b|c
      out[q] = (__m512bh)_mm512_permutexvar_epi16(idx, ta);
    }
    return;
  }
  const __m512 t2 = _mm512_sub_ps(d->base, lane_bcast(z, 2));
  const __m512 t3 = _mm512_sub_ps(d->base, lane_bcast(z, 3));
  const __m512i tb = (__m512i)_mm512_cvtne2ps_pbh(t3, t2);  // q = 2, 3
  for (int q = 0; q < 4; ++q) {
    const __m512i idx = _mm512_ternarylogic_epi32(sh[q], mask, d->word_grp, 0xEA);
    out[q] = (__m512bh)_mm512_permutex2var_epi16(ta, idx, tb);
  }
}

static inline __m512 dot_block(const __m512bh wv[4], const uint16_t* xb) {
  __m512 s = _mm512_dpbf16_ps(_mm512_setzero_ps(), wv[0], (__m512bh)_mm512_loadu_si512(xb));
  s = _mm512_dpbf16_ps(s, wv[1], (__m512bh)_mm512_loadu_si512(xb + 32));
  s = _mm512_dpbf16_ps(s, wv[2], (__m512bh)_mm512_loadu_si512(xb + 64));
  return _mm512_dpbf16_ps(s, wv[3], (__m512bh)_mm512_loadu_si512(xb + 96));
}

// M <= MS, blocks [b0, b0 + nb) of the NS rows against the mt rows of arranged x into acc; FP4:
// one chunk of blocks, its 16 scales per row decoded first (`whole`: all 16 lie inside the row,
// so a constant mask, measured faster). Each weight block is decoded once for all mt rows.
static inline __attribute__((always_inline)) void m1_blocks(const uint16_t* x, const Row* rows,
                                                            const Dec* d, __m512 (*acc)[MS],
                                                            int64_t b0, const int nb,
                                                            const int mt, const int kind,
                                                            const int asym, const int gpb,
                                                            const int whole) {
  __m512 held[NS];
  if (IS_FP4(kind))
    for (int j = 0; j < NS; ++j)
      held[j] = whole ? scales16(rows[j].s, kind, first_group(d, b0, gpb), 0xFFFF, d)
                      : fp4_scales(&rows[j], d, b0, kind, gpb);
#pragma GCC unroll 4
  for (int c = 0; c < nb; ++c) {
    const int64_t b = b0 + c;
    const __mmask16 gm = b == d->blocks - 1 ? d->tail_groups : d->full_groups;
    const uint16_t* xb = x + b * KB;
    const __m512i lanes = _mm512_add_epi32(d->lane_grp, _mm512_set1_epi32(c * gpb));
    for (int j = 0; j < NS; ++j) {
      __m512bh wv[4];
      _mm_prefetch((const char*)(rows[j].w + b * 64) + M1_PREFETCH_BYTES, _MM_HINT_T0);
      decode_block(&rows[j], d, b, wv, asym, gpb);
      const __m512 sv = IS_FP4(kind) ? _mm512_permutexvar_ps(lanes, held[j])
                                     : block_scales(&rows[j], d, b, 0, gm, NULL, kind, gpb);
      for (int i = 0; i < mt; ++i)
        acc[j][i] = _mm512_fmadd_ps(dot_block(wv, xb + i * d->blocks * KB), sv, acc[j][i]);
    }
  }
}

// M <= MS: NS rows (one from each of NS slices of the weight) at once: NS memory streams and
// NS x mt independent chains. Each stream requests its line M1_PREFETCH_BYTES ahead: the
// decode's ~13 vector ops per line fill the out-of-order window after ~20 lines, too few misses
// in flight for DRAM's latency, and the hardware prefetchers restart at every 4 KiB page (512
// measured best of 256..1024 here; median time 9-20% lower than with none). FP4 goes by chunks
// of blocks (fp4_chunk), the last one, where the row's scales end, on its own. Each output's
// sum runs in the same order at every mt, so a row of x gets the same bits alone (M = 1) as in
// a small batch.
static inline __attribute__((always_inline)) void rows_m1(const uint16_t* x, const Row* rows,
                                                          const Dec* d, float (*out)[MS],
                                                          const int mt, const int kind,
                                                          const int asym, const int gpb) {
  const int per = IS_FP4(kind) ? fp4_chunk(gpb) : 1;
  const int64_t whole = IS_FP4(kind) ? d->groups / 16 * per : d->blocks;  // in whole chunks
  __m512 acc[NS][MS];
  for (int j = 0; j < NS; ++j)
    for (int i = 0; i < mt; ++i) acc[j][i] = _mm512_setzero_ps();
  int64_t b0 = 0;
  for (; b0 < whole; b0 += per) m1_blocks(x, rows, d, acc, b0, per, mt, kind, asym, gpb, 1);
  if (b0 < d->blocks)
    m1_blocks(x, rows, d, acc, b0, (int)(d->blocks - b0), mt, kind, asym, gpb, 0);
  for (int j = 0; j < NS; ++j)
    for (int i = 0; i < mt; ++i) out[j][i] = _mm512_reduce_add_ps(acc[j][i]);
}

// nr (1 or 2) weight rows against mt rows of arranged x, blocks [b0, b1): adds the sums to
// out[j][0..mt). Two rows share each load of x (the loads, not the multiplies, bound one row).
static inline __attribute__((always_inline)) void row_tile(const uint16_t* x, const Row* r,
                                                           const Dec* d, int64_t b0, int64_t b1,
                                                           int64_t pf, float (*out)[MT],
                                                           const int nr, const int mt,
                                                           const int kind, const int asym,
                                                           const int gpb) {
  __m512 acc[2][MT], held[2] = {_mm512_setzero_ps(), _mm512_setzero_ps()};
  for (int j = 0; j < nr; ++j)
    for (int i = 0; i < mt; ++i) acc[j][i] = _mm512_setzero_ps();
  for (int64_t b = b0; b < b1; ++b) {
    const __mmask16 gm = b == d->blocks - 1 ? d->tail_groups : d->full_groups;
    __m512bh wv[2][4];
    __m512 sv[2];
    for (int j = 0; j < nr; ++j) {
      _mm_prefetch((const char*)(r[j].w + b * 64) + pf, _MM_HINT_T0);
      decode_block(&r[j], d, b, wv[j], asym, gpb);
      sv[j] = block_scales(&r[j], d, b, b0, gm, &held[j], kind, gpb);
    }
    for (int i = 0; i < mt; ++i) {
      const uint16_t* xb = x + (i * d->blocks + b) * KB;
      for (int j = 0; j < nr; ++j) acc[j][i] = _mm512_fmadd_ps(dot_block(wv[j], xb), sv[j], acc[j][i]);
    }
  }
  for (int j = 0; j < nr; ++j)
    for (int i = 0; i < mt; ++i) out[j][i] += _mm512_reduce_add_ps(acc[j][i]);
}

static inline void store_out(void* y, int out_kind, int64_t i, float v) {
  if (out_kind == 2) ((float*)y)[i] = v;
  else ((uint16_t*)y)[i] = to_bf16(v);
}

// M <= MS, weight rows i + j * slice for j < NS (the OpenMP loops live in the BODY functions
// below, so that the compile-time kind / asym / gpb reach the outlined loop bodies). Past N (the
// last slice's tail) a stream repeats row i, whose extra sums are not stored.
static inline __attribute__((always_inline)) void m1_rows(
    const uint16_t* x, const uint8_t* qweight, const void* scales, const int8_t* zeros,
    const Dec* d, const float* bias, void* y, int out_kind, int64_t m, int64_t n, int64_t slice,
    int64_t i, const int kind, const int asym, const int gpb) {
  Row rows[NS];
  float out[NS][MS];
  int ns = 0;
  for (int j = 0; j < NS; ++j) {
    const int real = i + j * slice < n;
    ns += real;
    rows[j] = row_at(qweight, scales, zeros, real ? i + j * slice : i, d, kind);
  }
  switch (m) {
#define MR(T) \
  case T: rows_m1(x, rows, d, out, T, kind, asym, gpb); break;
    MR(1) MR(2) MR(3) MR(4)
#undef MR
  }
  for (int j = 0; j < ns; ++j)
    for (int64_t r = 0; r < m; ++r)
      store_out(y, out_kind, r * n + i + j * slice,
                out[j][r] + (bias ? bias[i + j * slice] : 0.0f));
}

// M > MS: weight rows [RB * blk, RB * blk + RB) against all rows of x, MT at a time.
static inline __attribute__((always_inline)) void tile_rows(
    const uint16_t* x, const uint8_t* qweight, const void* scales, const int8_t* zeros,
    const Dec* d, const float* bias, void* y, int out_kind, int64_t m, int64_t n, int64_t blk,
    const int kind, const int asym, const int gpb) {
  const int64_t r0 = blk * RB, r1 = r0 + RB < n ? r0 + RB : n;
  for (int64_t m0 = 0; m0 < m; m0 += MT) {
    const int mt = m - m0 < MT ? (int)(m - m0) : MT;
    const uint16_t* xt = x + m0 * d->blocks * KB;
    int64_t span = X_TILE_BYTES / (2 * KB * mt);  // blocks of x kept in cache per pass
    if (span < 1) span = 1;
    // prefetch along the row when it is read whole, else the same spot of the next pair
    const int64_t pf = span >= d->blocks ? PREFETCH_BYTES : d->k;  // rows go in pairs
    float out[RB][MT] = {{0}};
    for (int64_t b0 = 0; b0 < d->blocks; b0 += span) {
      const int64_t b1 = b0 + span < d->blocks ? b0 + span : d->blocks;
      for (int64_t row = r0; row < r1; row += 2) {
        const int two = row + 1 < r1;
        const Row r[2] = {row_at(qweight, scales, zeros, row, d, kind),
                          row_at(qweight, scales, zeros, two ? row + 1 : row, d, kind)};
        float(*o)[MT] = &out[row - r0];
        switch (mt * 2 + two) {
#define TILE(T)                                                             \
  case 2 * T: row_tile(xt, r, d, b0, b1, pf, o, 1, T, kind, asym, gpb); break; \
  case 2 * T + 1: row_tile(xt, r, d, b0, b1, pf, o, 2, T, kind, asym, gpb); break;
          TILE(1) TILE(2) TILE(3) TILE(4) TILE(5) TILE(6) TILE(7) TILE(8)
#undef TILE
        }
      }
    }
    for (int64_t row = r0; row < r1; ++row)
      for (int i = 0; i < mt; ++i)
        store_out(y, out_kind, (m0 + i) * n + row, out[row - r0][i] + (bias ? bias[row] : 0.0f));
  }
}

typedef void (*BodyFn)(const uint16_t*, const uint8_t*, const void*, const int8_t*, const Dec*,
                       const float*, void*, int, int64_t, int64_t, int);

#define BODY(KIND, ASYM, GPB)                                                                  \
  static void body_##KIND##_##ASYM##_##GPB(const uint16_t* x, const uint8_t* q, const void* s, \
                                           const int8_t* z, const Dec* d, const float* bias,   \
                                           void* y, int ok, int64_t m, int64_t n, int nt) {    \
    if (m <= MS) {                                                                             \
      const int64_t slice = (n + NS - 1) / NS;                                                 \
      _Pragma("omp parallel for num_threads(nt) schedule(static)")                            \
      for (int64_t i = 0; i < slice; ++i)                                                      \
        m1_rows(x, q, s, z, d, bias, y, ok, m, n, slice, i, KIND, ASYM, GPB);                  \
      return;                                                                                  \
    }                                                                                          \
    const int64_t nblocks = (n + RB - 1) / RB;                                                 \
    _Pragma("omp parallel for num_threads(nt) schedule(static)")                              \
    for (int64_t blk = 0; blk < nblocks; ++blk)                                                \
      tile_rows(x, q, s, z, d, bias, y, ok, m, n, blk, KIND, ASYM, GPB);                       \
  }
#define BODIES(KIND, ASYM) BODY(KIND, ASYM, 1) BODY(KIND, ASYM, 2) BODY(KIND, ASYM, 4)
BODIES(0, 0) BODIES(0, 1) BODIES(1, 0) BODIES(1, 1) BODIES(2, 0) BODIES(2, 1)
BODY(3, 0, 1) BODY(3, 0, 8) BODY(4, 0, 1) BODY(4, 0, 4)  // FP4: symmetric, g 16 or 32 (or K)
#undef BODIES
#undef BODY

// [kind][asym][groups per block 1, 2, 4, 8]; NULL: a combination no format has
static const BodyFn BODIES_[S_KINDS][2][4] = {
#define ROW(KIND, ASYM) \
  {body_##KIND##_##ASYM##_1, body_##KIND##_##ASYM##_2, body_##KIND##_##ASYM##_4, NULL}
    {ROW(0, 0), ROW(0, 1)}, {ROW(1, 0), ROW(1, 1)}, {ROW(2, 0), ROW(2, 1)},
#undef ROW
    {{body_3_0_1, NULL, NULL, body_3_0_8}}, {{body_4_0_1, NULL, body_4_0_4, NULL}},
};

static int gpb_slot(int gpb) { return gpb == 8 ? 3 : gpb == 4 ? 2 : gpb == 2 ? 1 : 0; }

// x: bf16 [M, K] with row stride ldx; y: [M, N] bf16 (out_kind 0) or fp32 (2); gscale: NVFP4's
// global scale (ignored otherwise). Returns -1 when out of memory, -2 for a kind / zeros / group
// combination no format has.
int qp_w4a16_bf16(const uint16_t* x, int64_t ldx, const uint8_t* qweight, const void* scales,
                   int scale_kind, float gscale, const int8_t* zeros, const float* bias, void* y,
                   int out_kind, int64_t m, int64_t n, int64_t k, int64_t g, int nthreads) {
  if (scale_kind < 0 || scale_kind >= S_KINDS) return -2;
  const Dec d = make_dec(k, g, scale_kind, gscale);
  const BodyFn body = BODIES_[scale_kind][zeros != NULL][gpb_slot(gpb_of(&d))];
  if (!body) return -2;
  int owned;
  uint16_t* xa = scratch((size_t)m * d.blocks * KB * 2, &owned);
  if (!xa) return -1;  // out of memory for the arranged x
  qp_arrange_bf16(x, ldx, m, k, xa);
  body(xa, qweight, scales, zeros, &d, bias, y, out_kind, m, n, nthreads);
  if (owned) free(xa);
  return 0;
}

// ---- fp32 activations -----------------------------------------------------------------------

static inline float load_scale(const void* scales, int64_t i, int kind) {
  if (kind == 2) return ((const float*)scales)[i];
  uint16_t h = ((const uint16_t*)scales)[i];
  if (kind == 1) return _cvtsh_ss(h);
  uint32_t bits = (uint32_t)h << 16;
  float f;
  memcpy(&f, &bits, sizeof f);
  return f;
}

// ---- GEMM on decoded weight strips (bf16 x, larger M) ---------------------------------------
//
// The weight is decoded once per call, 16 rows x GKC k at a time, into bf16 pairs laid out for a
// broadcast microkernel: strip[p][i] (32 bits) = (c[r0 + i][k0 + 2p], c[r0 + i][k0 + 2p + 1]),
// c = code - zero, a small integer (exact in bf16); each block's scales (and zeros) are
// transposed once per call to [group][16 rows] (block_tables).
// Decode per 32 weights: one vpmultishiftqb puts each weight's nibble in the low bits of its
// word (of the 16 rows' 64-byte lines transposed, lane i = row i), one vpermw looks up its bf16
// value (asymmetric: the nibble less 8 + zero, as a 5-bit index into a signed table first).
// x is packed to [K / GKC chunks][strips][GKC / 2][GMR] pairs. The microkernel runs up to GMR
// rows of x times two strips (32 weight rows): one vdpbf16ps per (row, strip, k pair) into a
// per-segment fp32 accumulator (the products are exact in fp32), and per segment (a group, or
// the part of it in this chunk) one fma adds accumulator x scale to the total. Per chunk each
// strip pair runs over all of x (one contiguous stream): the pair stays in L1, the chunk of x in
// L2. So y is x @ W.T with W the fp32 (code - zero) * scale, as the native kernel computes it,
// up to fp32 summation order. The
// decode is amortised over all M rows. Blocks of GNB weight rows are split across threads; each
// output's sum runs in a fixed order: the result does not depend on the thread count.

#define GN 16     // weight rows per strip (one zmm of outputs)
#define GNB 64    // weight rows per block of work (four strips, one OpenMP iteration)
#define GKC 128   // k per decoded chunk (a strip pair of it, 8 KiB, stays in L1 as x streams)
#define GMR 6     // rows of x per microkernel (2 x 6 segment + 2 x 6 total accumulators)
#define GGROUPS (GKC / 32)  // groups in a chunk at most

// Rows of x per strip: M split into ceil(M / GMR) strips as evenly as possible.
static inline int64_t strip_row(int64_t m, int64_t s) {
  const int64_t strips = (m + GMR - 1) / GMR, base = m / strips, extra = m % strips;
  return s * base + (s < extra ? s : extra);
}

// x bf16 [M, K] (row stride ldx) -> per GKC chunk of K, [strips][kc / 2][GMR] 32-bit pairs
// (chunk k0 at offset k0 / 2 * strips * GMR: the microkernel calls of one chunk read one
// contiguous stream): strip s holds rows strip_row(m, s) .. strip_row(m, s + 1) - 1, zero past
// them.
static void pack_x_pairs(const uint16_t* x, int64_t ldx, int64_t m, int64_t k, uint32_t* xp) {
  const int64_t strips = (m + GMR - 1) / GMR;
  for (int64_t k0 = 0; k0 < k; k0 += GKC) {
    const int64_t kcp = (k - k0 < GKC ? k - k0 : GKC) / 2;
    for (int64_t s = 0; s < strips; ++s) {
      uint32_t* o = xp + (k0 / 2 * strips + s * kcp) * GMR;
      const int64_t r0 = strip_row(m, s), rows = strip_row(m, s + 1) - r0;
      for (int r = 0; r < GMR; ++r) {
        if (r >= rows) {
          for (int64_t p = 0; p < kcp; ++p) o[p * GMR + r] = 0;
          continue;
        }
        const uint16_t* xr = x + (r0 + r) * ldx + k0;  // rows may start at any even address
        for (int64_t p = 0; p < kcp; ++p) memcpy(o + p * GMR + r, xr + 2 * p, 4);
      }
    }
  }
}

// 16 x 16 transpose of 32-bit lanes: on return r[c] lane i = (input r[i]) lane c.
static inline __attribute__((always_inline)) void transpose16(__m512i r[16]) {
  __m512i t[16];
  for (int i = 0; i < 8; ++i) {
    t[2 * i] = _mm512_unpacklo_epi32(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_epi32(r[2 * i], r[2 * i + 1]);
  }
  for (int i = 0; i < 4; ++i) {  // r[4i + j] 128-bit lane L: rows 4i..4i+3 at column 4L + j
    r[4 * i] = _mm512_unpacklo_epi64(t[4 * i], t[4 * i + 2]);
    r[4 * i + 1] = _mm512_unpackhi_epi64(t[4 * i], t[4 * i + 2]);
    r[4 * i + 2] = _mm512_unpacklo_epi64(t[4 * i + 1], t[4 * i + 3]);
    r[4 * i + 3] = _mm512_unpackhi_epi64(t[4 * i + 1], t[4 * i + 3]);
  }
  for (int j = 0; j < 4; ++j) {  // a 4 x 4 transpose of 128-bit lanes per j
    const __m512i s0 = _mm512_shuffle_i32x4(r[j], r[4 + j], 0x44);
    const __m512i s1 = _mm512_shuffle_i32x4(r[j], r[4 + j], 0xEE);
    const __m512i s2 = _mm512_shuffle_i32x4(r[8 + j], r[12 + j], 0x44);
    const __m512i s3 = _mm512_shuffle_i32x4(r[8 + j], r[12 + j], 0xEE);
    t[j] = _mm512_shuffle_i32x4(s0, s2, 0x88);
    t[4 + j] = _mm512_shuffle_i32x4(s0, s2, 0xDD);
    t[8 + j] = _mm512_shuffle_i32x4(s1, s3, 0x88);
    t[12 + j] = _mm512_shuffle_i32x4(s1, s3, 0xDD);
  }
  for (int c = 0; c < 16; ++c) r[c] = t[c];
}

// The GEMM's decode needs AVX-512 VBMI (vpmultishiftqb) beside what qp_cpu_supported checks;
// its functions are compiled for it alone (VBMI), so the rest of the library does not need it.
#define VBMI __attribute__((target("avx512vbmi")))

int qp_gemm_supported(void) { return qp_cpu_supported() && __builtin_cpu_supports("avx512vbmi"); }

// A decoded chunk of one strip: the (code - zero) pairs.
typedef struct {
  uint32_t w[GKC / 2 * GN] __attribute__((aligned(64)));
} Strip;

// A block's scales (and, asymmetric, 8 + zero in both 16-bit halves) transposed for the
// microkernel: st[(strip * groups + group) * 16 + i] = row (n0 + 16 strip + i)'s, zero past n.
static void block_tables(const void* scales, int kind, const int8_t* zeros, const Dec* d,
                         int64_t n, int64_t n0, float* st, uint32_t* zt) {
  const int64_t groups = d->groups;
  for (int s = 0; s < GNB / GN; ++s)
    for (int64_t gb = 0; gb < groups; gb += 16) {
      const int64_t count = groups - gb < 16 ? groups - gb : 16;
      const __mmask16 mask = (__mmask16)((1u << count) - 1);
      __m512i r[16], z[16];
      for (int i = 0; i < GN; ++i) {
        const int64_t row = n0 + s * GN + i;
        const int in = row < n;
        r[i] = in ? (__m512i)scales16(scales, kind, row * groups + gb, mask, d)
                  : _mm512_setzero_si512();
        if (zeros) {
          const __m128i zb = _mm_maskz_loadu_epi8(mask, zeros + row * groups + gb);
          z[i] = in ? _mm512_mullo_epi32(_mm512_add_epi32(_mm512_cvtepi8_epi32(zb),
                                                          _mm512_set1_epi32(8)),
                                         _mm512_set1_epi32(0x10001))
                    : _mm512_setzero_si512();
        }
      }
      transpose16(r);
      if (zeros) transpose16(z);
      for (int c = 0; c < count; ++c) {
        _mm512_store_si512(st + ((s * groups) + gb + c) * GN, r[c]);
        if (zeros) _mm512_store_si512(zt + ((s * groups) + gb + c) * GN, z[c]);
      }
    }
}

// vpmultishiftqb controls: for byte q of each 32-bit lane (two per qword), the lane's word 0
// takes bits 8q.. (the low nibble of byte q), word 1 bits 8q + 4.. (its high nibble).
#define MS_LANE(q, o) (o) + 8 * (q), 0, (o) + 8 * (q) + 4, 0
#define MS_QWORD(q) MS_LANE(q, 0), MS_LANE(q, 32)
#define MS_CTRL(q) {MS_QWORD(q), MS_QWORD(q), MS_QWORD(q), MS_QWORD(q), \
                    MS_QWORD(q), MS_QWORD(q), MS_QWORD(q), MS_QWORD(q)}
static const uint8_t MS_CTRL_[4][64] __attribute__((aligned(64))) = {
    MS_CTRL(0), MS_CTRL(1), MS_CTRL(2), MS_CTRL(3)};
#undef MS_CTRL
#undef MS_QWORD
#undef MS_LANE
// bf16 of the 5-bit two's complement i (asymmetric INT4: nibble - (8 + zero) in -15..15; the
// symmetric tables are the Dec's lut).
static const uint16_t SIGNED_BF16[32] __attribute__((aligned(64))) = {
    0x0000, 0x3F80, 0x4000, 0x4040, 0x4080, 0x40A0, 0x40C0, 0x40E0,
    0x4100, 0x4110, 0x4120, 0x4130, 0x4140, 0x4150, 0x4160, 0x4170,
    0xC180, 0xC170, 0xC160, 0xC150, 0xC140, 0xC130, 0xC120, 0xC110,
    0xC100, 0xC0E0, 0xC0C0, 0xC0A0, 0xC080, 0xC040, 0xC000, 0xBF80};

// Weight rows [r0, r0 + 16) (lanes past n are zero), k in [k0, k0 + kc), into st; zt: the
// strip's zero table (block_tables), asymmetric only.
static inline VBMI __attribute__((always_inline)) void decode_strip(
    const uint8_t* qweight, const Dec* d, int64_t n, int64_t r0, int64_t k0, int64_t kc,
    const uint32_t* zt, Strip* st, const int asym) {
  const int64_t lanes = n - r0 < GN ? n - r0 : GN;
  if (lanes <= 0) {
    memset(st, 0, sizeof *st);
    return;
  }
  const int64_t half = d->k / 2;
  const __m512i lut = asym ? _mm512_load_si512(SIGNED_BF16) : d->lut;  // INT4 or E2M1
  const __m512i low4 = _mm512_set1_epi16(0xF);
  const uint8_t* wb = qweight + r0 * half + k0 / 2;
  if (k0 + kc < d->k)  // the next chunk of these rows, while this one is multiplied
    for (int i = 0; i < lanes; ++i)
      for (int64_t off = 0; off < GKC / 2; off += 64)
        _mm_prefetch((const char*)(wb + i * half + kc / 2 + off), _MM_HINT_T0);
  for (int64_t b = 0; b < kc; b += KB) {
    const int64_t words = kc - b < KB ? (kc - b) / 8 : 16;  // 32-bit lanes of a row inside K
    const __mmask16 wm = (__mmask16)((1u << words) - 1);
    __m512i r[16];
    for (int i = 0; i < GN; ++i)
      r[i] = i < lanes ? _mm512_maskz_loadu_epi32(wm, wb + i * half + b / 2) : _mm512_setzero_si512();
    transpose16(r);
    for (int c = 0; c < words; ++c) {
      __m512i zv = _mm512_setzero_si512();
      if (asym) zv = _mm512_load_si512(zt + (d->shift >= 62 ? 0 : (k0 + b + 8 * c) >> d->shift) * GN);
      for (int q = 0; q < 4; ++q) {
        __m512i idx = _mm512_multishift_epi64_epi8(_mm512_load_si512(MS_CTRL_[q]), r[c]);
        if (asym) idx = _mm512_sub_epi16(_mm512_and_si512(idx, low4), zv);  // vpermw: low 5 bits
        _mm512_store_si512(st->w + ((b / 2) + 4 * c + q) * GN, _mm512_permutexvar_epi16(idx, lut));
      }
    }
  }
}

// acc + w . (the pair at p, broadcast): the broadcast folded into vdpbf16ps's memory operand
// (compilers materialise a broadcast used twice in a register, one more instruction per row).
static inline __attribute__((always_inline)) __m512 dp_bcast(__m512 acc, __m512bh w,
                                                             const uint32_t* p) {
  __asm__("vdpbf16ps %2%{1to16%}, %1, %0" : "+v"(acc) : "v"(w), "m"(*p));
  return acc;
}

// mr rows of packed x (xs: [steps][GMR]) times strips a, b over kc / 2 steps in segments of seg
// steps (segment sg: one group, scales at sa0 / sb0 + 16 sg): c[r * ldc + 0..31] += the sums.
static inline __attribute__((always_inline)) void gemm_micro(const uint32_t* xs, const Strip* a,
                                                             const Strip* b, const float* sa0,
                                                             const float* sb0, int64_t steps,
                                                             int64_t seg, float* c, int64_t ldc,
                                                             const int mr) {
  __m512 tot[GMR][2];
#pragma GCC unroll 6
  for (int r = 0; r < mr; ++r)
    tot[r][0] = _mm512_loadu_ps(c + r * ldc), tot[r][1] = _mm512_loadu_ps(c + r * ldc + GN);
  for (int64_t p0 = 0, sg = 0; p0 < steps; p0 += seg, ++sg) {
    const int64_t p1 = p0 + seg < steps ? p0 + seg : steps;
    __m512 acc[GMR][2];
#pragma GCC unroll 6
    for (int r = 0; r < mr; ++r) acc[r][0] = _mm512_setzero_ps(), acc[r][1] = _mm512_setzero_ps();
    for (int64_t p = p0; p < p1; ++p) {
      _mm_prefetch((const char*)(xs + (p + 32) * GMR), _MM_HINT_T0);  // x from L2, 768 B ahead
      const __m512bh w0 = (__m512bh)_mm512_load_si512(a->w + p * GN);
      const __m512bh w1 = (__m512bh)_mm512_load_si512(b->w + p * GN);
      const uint32_t* xq = xs + p * GMR;
#pragma GCC unroll 6
      for (int r = 0; r < mr; ++r) {
        acc[r][0] = dp_bcast(acc[r][0], w0, xq + r);
        acc[r][1] = dp_bcast(acc[r][1], w1, xq + r);
      }
    }
    const __m512 sa = _mm512_load_ps(sa0 + sg * GN), sb = _mm512_load_ps(sb0 + sg * GN);
#pragma GCC unroll 6
    for (int r = 0; r < mr; ++r) {
      tot[r][0] = _mm512_fmadd_ps(acc[r][0], sa, tot[r][0]);
      tot[r][1] = _mm512_fmadd_ps(acc[r][1], sb, tot[r][1]);
    }
  }
#pragma GCC unroll 6
  for (int r = 0; r < mr; ++r)
    _mm512_storeu_ps(c + r * ldc, tot[r][0]), _mm512_storeu_ps(c + r * ldc + GN, tot[r][1]);
}

// store_out for 16 lanes (those in mask) at y[i..]: bf16 rounded as to_bf16 does (to nearest
// even, NaN kept quiet, subnormals kept: not vcvtneps2bf16, which flushes them).
static inline __attribute__((always_inline)) void store_out16(void* y, int out_kind, int64_t i,
                                                              __m512 v, __mmask16 mask) {
  if (out_kind == 2) {
    _mm512_mask_storeu_ps((float*)y + i, mask, v);
    return;
  }
  const __m512i u = _mm512_castps_si512(v);
  const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  const __m512i bias = _mm512_add_epi32(odd, _mm512_set1_epi32(0x7FFF));
  __m512i h = _mm512_srli_epi32(_mm512_add_epi32(u, bias), 16);
  const __mmask16 nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
  h = _mm512_mask_or_epi32(h, nan, _mm512_srli_epi32(u, 16), _mm512_set1_epi32(0x40));
  _mm256_mask_storeu_epi16((uint16_t*)y + i, mask, _mm512_cvtepi32_epi16(h));
}

static VBMI void gemm_block(const uint32_t* xp, const uint8_t* qweight, const void* scales,
                            const int8_t* zeros, int kind, const Dec* d, const float* bias,
                            void* y, int out_kind, int64_t m, int64_t n, int64_t blk,
                            Strip* panel, float* cb, float* st, uint32_t* zt) {
  const int64_t k = d->k, strips = (m + GMR - 1) / GMR, n0 = blk * GNB;
  const int64_t groups = d->groups;
  // k pairs per segment: a group, or a whole chunk when groups are larger (per channel)
  const int64_t seg = d->shift >= 62 || ((int64_t)1 << d->shift) >= GKC ? GKC / 2
                                                                         : ((int64_t)1 << d->shift) / 2;
  block_tables(scales, kind, zeros, d, n, n0, st, zt);
  memset(cb, 0, (size_t)m * GNB * 4);
  for (int64_t k0 = 0; k0 < k; k0 += GKC) {
    const int64_t kc = k - k0 < GKC ? k - k0 : GKC;
    const int64_t g0 = d->shift >= 62 ? 0 : k0 >> d->shift;
    for (int s = 0; s < GNB / GN; ++s) {
      const uint32_t* zs = zt + s * groups * GN;
      if (zeros) decode_strip(qweight, d, n, n0 + s * GN, k0, kc, zs, &panel[s], 1);
      else decode_strip(qweight, d, n, n0 + s * GN, k0, kc, zs, &panel[s], 0);
    }
    for (int pair = 0; pair < GNB / (2 * GN); ++pair) {  // a strip pair (16 KiB) stays in L1
      if (n0 + 2 * GN * pair >= n) break;
      const Strip* a = &panel[2 * pair];
      const float* sa = st + (2 * pair * groups + g0) * GN;
      const float* sb = sa + groups * GN;
      for (int64_t ms = 0; ms < strips; ++ms) {  // while the chunk's x streams past
        const int mr = (int)(strip_row(m, ms + 1) - strip_row(m, ms));
        const uint32_t* xs = xp + (k0 / 2 * strips + ms * (kc / 2)) * GMR;
        float* c = cb + strip_row(m, ms) * GNB + 2 * GN * pair;
        switch (mr) {
#define MICRO(T) \
  case T: gemm_micro(xs, a, a + 1, sa, sb, kc / 2, seg, c, GNB, T); break;
          MICRO(1) MICRO(2) MICRO(3) MICRO(4) MICRO(5) MICRO(6)
#undef MICRO
        }
      }
    }
  }
  const int64_t cols = n - n0 < GNB ? n - n0 : GNB;
  for (int64_t j = 0; j < cols; j += GN) {
    const __mmask16 mask = (__mmask16)(cols - j >= GN ? 0xFFFF : (1u << (cols - j)) - 1);
    const __m512 bv = bias ? _mm512_maskz_loadu_ps(mask, bias + n0 + j) : _mm512_setzero_ps();
    for (int64_t r = 0; r < m; ++r)
      store_out16(y, out_kind, r * n + n0 + j, _mm512_add_ps(_mm512_load_ps(cb + r * GNB + j), bv),
                  mask);
  }
}

// x: bf16 [M, K] with row stride ldx; y: [M, N] bf16 (out_kind 0) or fp32 (2). Returns -1 when
// out of memory for the packed x or the per-thread buffers.
int qp_w4a16_gemm_bf16(const uint16_t* x, int64_t ldx, const uint8_t* qweight,
                        const void* scales, int scale_kind, float gscale, const int8_t* zeros,
                        const float* bias, void* y, int out_kind, int64_t m, int64_t n, int64_t k,
                        int64_t g, int nthreads) {
  if (scale_kind < 0 || scale_kind >= S_KINDS || (IS_FP4(scale_kind) && zeros)) return -2;
  const Dec d = make_dec(k, g, scale_kind, gscale);
  const int64_t strips = (m + GMR - 1) / GMR, nblocks = (n + GNB - 1) / GNB;
  uint32_t* xp = aligned_alloc(64, ((size_t)strips * GMR * (k / 2) * 4 + 63) & ~(size_t)63);
  if (!xp) return -1;
  pack_x_pairs(x, ldx, m, k, xp);
  int failed = 0;
#pragma omp parallel num_threads(nthreads)
  {
    Strip* panel = aligned_alloc(64, sizeof(Strip) * (GNB / GN));
    float* cb = aligned_alloc(64, ((size_t)m * GNB * 4 + 63) & ~(size_t)63);
    const size_t table = (size_t)GNB * d.groups * 4;  // a multiple of 64
    float* st = aligned_alloc(64, table);
    uint32_t* zt = zeros ? aligned_alloc(64, table) : NULL;
    const int ok = panel && cb && st && (zt || !zeros);
    if (!ok) {
#pragma omp atomic write
      failed = 1;
    }
#pragma omp for schedule(static)
    for (int64_t blk = 0; blk < nblocks; ++blk)
      if (ok)
        gemm_block(xp, qweight, scales, zeros, scale_kind, &d, bias, y, out_kind, m, n, blk,
                   panel, cb, st, zt);
    free(panel);
    free(cb);
    free(st);
    free(zt);
  }
  free(xp);
  return failed ? -1 : 0;
}

// One weight row against mt rows of fp32 x ([M, Q, 2, 16], see arrange_f32): per 32 k, the
// codes of even k (lo) and odd k (hi) looked up in the 16-entry fp32 table, their dot with x,
// times the scale of each lane's group (g = 16: lanes 0-7 and 8-15 are two groups).
static inline __attribute__((always_inline)) void row_tile_f32(
    const float* x, const Row* r, __m512 codes, int64_t k, int shift, int kind, float* out,
    const int mt) {
  const int64_t nq = (k + 31) / 32;
  __m512 acc[MT];
  for (int i = 0; i < mt; ++i) acc[i] = _mm512_setzero_ps();
  for (int64_t q = 0; q < nq; ++q) {
    _mm_prefetch((const char*)(r->w + q * 16) + PREFETCH_BYTES, _MM_HINT_T0);
    const int64_t grp = shift >= 62 ? 0 : (q * 32) >> shift;
    const __m512 table = r->z ? _mm512_sub_ps(codes, _mm512_set1_ps(r->z[grp])) : codes;
    const __mmask16 wm = (q + 1) * 32 <= k ? 0xFFFF : 0x00FF;  // K % 32 == 16: half a step
    const __m512i idx = _mm512_cvtepu8_epi32(_mm_maskz_loadu_epi8(wm, r->w + q * 16));
    const __m512 lo = _mm512_permutexvar_ps(idx, table);  // vpermps reads the low 4 index bits
    const __m512 hi = _mm512_permutexvar_ps(_mm512_srli_epi32(idx, 4), table);
    const __m512 s0 = _mm512_set1_ps(load_scale(r->s, grp, kind));
    const __m512 sv = shift == 4 ? _mm512_mask_blend_ps(0xFF00, s0, _mm512_set1_ps(load_scale(r->s, grp + 1, kind)))
                                 : s0;
    for (int i = 0; i < mt; ++i) {
      const float* xq = x + (i * nq + q) * 32;
      __m512 s = _mm512_mul_ps(lo, _mm512_loadu_ps(xq));
      s = _mm512_fmadd_ps(hi, _mm512_loadu_ps(xq + 16), s);
      acc[i] = _mm512_fmadd_ps(s, sv, acc[i]);
    }
  }
  for (int i = 0; i < mt; ++i) out[i] = _mm512_reduce_add_ps(acc[i]);
}

// x: fp32 [M, K] with row stride ldx; y fp32 [M, N]; gscale as for qp_w4a16_bf16. FP4's scales
// are decoded per row (16 at a time, scales16) into a per-thread fp32 buffer, which then serves
// as the row's fp32 scales. Returns -1 when out of memory, -2 for FP4 with zeros.
int qp_w4a16_f32(const float* x, int64_t ldx, const uint8_t* qweight, const void* scales,
                  int scale_kind, float gscale, const int8_t* zeros, const float* bias, float* y,
                  int64_t m, int64_t n, int64_t k, int64_t g, int nthreads) {
  if (scale_kind < 0 || scale_kind >= S_KINDS || (IS_FP4(scale_kind) && zeros)) return -2;
  const Dec d = make_dec(k, g, scale_kind, gscale);
  const int64_t nq = (k + 31) / 32;
  const int fp4 = IS_FP4(scale_kind);
  int owned, failed = 0;
  float* xa = scratch((size_t)m * nq * 32 * 4, &owned);
  if (!xa) return -1;
  arrange_f32(x, ldx, m, k, xa);
#pragma omp parallel num_threads(nthreads)
  {
    // the row's decoded scales, zero up to a multiple of 16 (+ 16: g = 16 reads group + 1)
    const size_t sbytes = ((size_t)(d.groups + 31) / 16 * 16 * 4 + 63) & ~(size_t)63;
    float* sb = fp4 ? aligned_alloc(64, sbytes) : NULL;
    if (fp4 && !sb) {
#pragma omp atomic write
      failed = 1;
    }
#pragma omp for schedule(static)
    for (int64_t row = 0; row < n; ++row) {
      if (fp4 && !sb) continue;
      Row r = row_at(qweight, scales, zeros, row, &d, scale_kind);
      int kind = scale_kind;
      if (fp4) {
        for (int64_t at = 0; at < d.groups + 1; at += 16) {
          const int64_t left = d.groups - at;
          const __mmask16 mask = left >= 16 ? 0xFFFF : left <= 0 ? 0 : (__mmask16)((1u << left) - 1);
          _mm512_storeu_ps(sb + at, scales16(r.s, scale_kind, at, mask, &d));
        }
        r.s = (const char*)sb;
        kind = S_F32;
      }
      for (int64_t m0 = 0; m0 < m; m0 += MT) {
        const int mt = m - m0 < MT ? (int)(m - m0) : MT;
        const float* xt = xa + m0 * nq * 32;
        float out[MT];
        switch (mt) {
#define TILE(T) \
  case T: row_tile_f32(xt, &r, d.base, k, d.shift, kind, out, T); break;
          TILE(1) TILE(2) TILE(3) TILE(4) TILE(5) TILE(6) TILE(7) TILE(8)
#undef TILE
        }
        for (int i = 0; i < mt; ++i) y[(m0 + i) * n + row] = out[i] + (bias ? bias[row] : 0.0f);
      }
    }
    free(sb);
  }
  if (owned) free(xa);
  return failed ? -1 : 0;
}
